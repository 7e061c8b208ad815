"""EPSANet: ResNet with Pyramid Squeeze Attention bottlenecks.

An EPSANet is timm's ``ResNet`` (7x7 stem, max pool, four stages, avg pool + linear head) built of
:class:`PSABottleneck` blocks, whose 3x3 conv is a PSA layer. The class *is* ``ResNet``: the whole timm
model contract (features, intermediates, checkpointing, classifier reset, ...) holds, and every module
that holds parameters is called in the forward pass. The variants (depth, width, PSA configuration)
are the table in :mod:`epsanet.models.variants`. CPU speed-ups are explicit transforms
(:func:`epsanet.optimize_for_inference`, :func:`epsanet.optimize_for_training`), not part of the model.

Paper: "EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network",
Zhang et al., ACCV 2022, https://arxiv.org/abs/2105.14447
"""
import logging
import math
import re
from functools import partial
from typing import Any, Dict, Optional, Type

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_aa
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import ResNet
from torch import nn

from ..layers.psa import PyramidSqueezeAttention
from .variants import SMALL_PSA, VARIANTS

__all__ = ['EPSANet', 'PSABottleneck', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

EPSANet = ResNet
"""The class of every EPSANet model: timm's ``ResNet`` (of :class:`PSABottleneck` blocks)."""


class PSABottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the middle conv) whose 3x3 conv is a PSA layer.

    Same signature and module names as timm's ``Bottleneck`` (``conv1/bn1``, ``conv2/bn2``,
    ``conv3/bn3``, ``downsample``), so timm's ``ResNet`` builds the network around it.
    ``psa_kwargs`` go to :class:`~epsanet.layers.PyramidSqueezeAttention`.
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            psa_kwargs: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if cardinality != 1:
            raise ValueError('PSABottleneck sets its groups through psa_kwargs["groups"]; cardinality must be 1.')
        if attn_layer is not None:
            raise ValueError('PSABottleneck already has attention (PSA); attn_layer must be None.')
        psa_kwargs = {**SMALL_PSA, **(psa_kwargs or {})}
        width = int(math.floor(planes * (base_width / 64)))
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = PyramidSqueezeAttention(
            first_planes, width, stride=1 if use_aa else stride, dilation=first_dilation, **psa_kwargs, **dd)
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa, **dd)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = self.aa(self.act2(self.drop_block(self.bn2(x))))
        x = self.conv3(x)
        x = self.bn3(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


_AUTHOR_BRANCH_KEY = re.compile(r'\.conv2\.conv_(\d+)\.')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an authors' or timm-style EPSANet state dict onto this implementation.

    * strips the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes;
    * renames the authors' PSA branches ``conv2.conv_{i}`` (1-based) to ``conv2.convs.{i-1}``;
    * reshapes SE weights saved as linear ``[out, in]`` to 1x1 conv ``[out, in, 1, 1]``.

    Then checks the result against ``model`` and raises ``ValueError`` listing every missing and
    unexpected key and every shape mismatch, e.g. Small weights offered to a Large model. The
    stem conv is left to timm, which adapts ``in_chans``. A classifier whose class count differs
    from the model's is replaced by the model's freshly initialised one, with a log line (timm
    drops it too when ``num_classes`` differs from the pretrained cfg's).
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        k = _AUTHOR_BRANCH_KEY.sub(lambda m: f'.conv2.convs.{int(m.group(1)) - 1}.', k)
        if '.se.fc' in k and k.endswith('.weight') and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    _check_fits(out, target, skip=_adapted_keys(model))
    _reinit_classifier(out, target, model)
    return out


def _reinit_classifier(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], model: nn.Module) -> None:
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'fc'
    w, b = f'{name}.weight', f'{name}.bias'
    if w not in state_dict or w not in target or state_dict[w].shape == target[w].shape:
        return
    _logger.info(
        f'Re-initialising the classifier "{name}": the checkpoint has {state_dict[w].shape[0]} classes, '
        f'the model {target[w].shape[0]}.')
    state_dict[w] = target[w]
    if b in target:
        state_dict[b] = target[b]


def _adapted_keys(model: nn.Module) -> set:
    """Keys timm adapts itself after filtering: the stem conv (in_chans) and classifier (num_classes)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = [cfg.get('first_conv', 'conv1'), cfg.get('classifier', 'fc')]
    return {f'{n}.{p}' for n in names for p in ('weight', 'bias')}


def _check_fits(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], skip: set) -> None:
    missing = sorted(k for k in target if k not in state_dict and k not in skip)
    unexpected = sorted(k for k in state_dict if k not in target and k not in skip)
    mismatched = sorted(
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
        for k, v in state_dict.items()
        if k in target and k not in skip and tuple(v.shape) != tuple(target[k].shape))
    if missing or unexpected or mismatched:
        def _section(title, items, limit=20):
            more = f'    ... and {len(items) - limit} more\n' if len(items) > limit else ''
            return f'  {title} ({len(items)}):\n' + ''.join(f'    {i}\n' for i in items[:limit]) + more
        raise ValueError(
            'The checkpoint does not fit this EPSANet architecture (was it saved from another model, '
            'e.g. Small vs Large or 50 vs 101?).\n'
            + _section('missing keys', missing) + _section('unexpected keys', unexpected)
            + _section('shape mismatches', mismatched)
            + 'Create the model the checkpoint was trained as, e.g. timm.create_model("epsanet50_large", ...).')


def _create_epsanet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    """Build ``variant`` (a row of :data:`~epsanet.models.variants.VARIANTS`) through timm. With
    ``pretrained=True`` the weights are fetched, verified and read safely by
    :func:`epsanet.weights.loading.build_pretrained`, which raises a clear error (with the three ways to
    give weights: file, URL, Hub id) when none are registered or given."""
    kwargs = {**VARIANTS[variant].model_args(), 'block': PSABottleneck, **kwargs}
    build = partial(build_model_with_cfg, ResNet, variant, pretrained_filter_fn=checkpoint_filter_fn)
    if pretrained:
        from ..weights.loading import build_pretrained
        return build_pretrained(build, variant, **kwargs)
    return build(False, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:2105.14447',
        'paper_name': 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
        'origin_url': 'https://github.com/murufeng/EPSANet',
        **kwargs,
    }


# Pretrained weights are plain timm cfgs (``hf_hub_id`` or ``url``), listed here as in any timm model file,
# a model's first tag being its default; ``weights/registry.json`` holds each file's sha256, size,
# provenance and metrics. The authors never released ImageNet weights and nobody has published any
# yet, so every model has only the ``.untrained`` tag.
default_cfgs = generate_default_cfgs({
    # published weights go first, e.g. 'epsanet50.in1k': _cfg(hf_hub_id='org/repo@<commit>', ...),
    **{f'{name}.untrained': _cfg() for name in VARIANTS},
})


@register_model
def epsanet50(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 (Small): 22.56 M params, 3.62 GFLOPs; the authors' published architecture."""
    return _create_epsanet('epsanet50', pretrained, **kwargs)


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 (Large): 27.90 M params, 4.72 GFLOPs; 2x wide split-input PSA."""
    return _create_epsanet('epsanet50_large', pretrained, **kwargs)


@register_model
def epsanet101(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 (Small): 38.90 M params, 6.82 GFLOPs."""
    return _create_epsanet('epsanet101', pretrained, **kwargs)


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 (Large): 49.59 M params, 8.97 GFLOPs; 2x wide split-input PSA."""
    return _create_epsanet('epsanet101_large', pretrained, **kwargs)
