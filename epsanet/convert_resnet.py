"""Plug-and-play PSA: turn the bottleneck 3x3 convs of a ResNet-family model into PSA layers.

``psa_convert(timm.create_model("resnet50"))`` swaps the ``conv2`` of every bottleneck for a
:class:`~epsanet.layers.PyramidSqueezeAttention` with the same input and output channels, stride
and dilation, and keeps every other weight (stem, 1x1 convs, BatchNorms, shortcuts, classifier,
SE/attention modules). A converted timm ``resnet50`` has exactly the architecture and state-dict
keys of ``epsanet50``, so EPSANet-50 weights load into it unchanged.

Works on timm's ``Bottleneck`` (resnet50/101/152, resnet50d, resnext, seresnet, ... ) and
torchvision's ``Bottleneck``. The new PSA layers are initialised as timm initialises ResNet
convs (Kaiming normal, fan-out) and need training.
"""
from typing import Optional, Sequence, Tuple, Type

import torch
from timm.models.resnet import Bottleneck as TimmBottleneck
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from .layers.psa import PyramidSqueezeAttention

__all__ = ['psa_convert']

BOTTLENECK_TYPES: Tuple[Type[nn.Module], ...] = (TimmBottleneck, TorchvisionBottleneck)


def psa_convert(
        model: nn.Module,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        groups: Sequence[int] = (1, 4, 8, 16),
        split_input: bool = False,
        rd_ratio: float = 1. / 16,
        stages: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Replace the 3x3 conv (``conv2``) of every bottleneck block of ``model`` by a PSA layer, in place.

    Args:
        model: a timm (or torchvision) ResNet-family model built from ``Bottleneck`` blocks.
        kernel_sizes, groups, split_input, rd_ratio: the PSA configuration; the defaults are
            EPSANet Small's (:data:`epsanet.models.variants.SMALL_PSA`). The conv's own groups
            (e.g. ResNeXt's cardinality) are replaced by ``groups``.
        stages: only convert blocks of these stages (``layer1``..``layer4`` -> 1..4); all by default.

    Returns:
        ``model`` itself, converted.

    Raises:
        ValueError: no bottleneck to convert, or a block whose widths the PSA configuration
            cannot split (the message names the block and the rule).
    """
    prefixes = tuple(f'layer{i}.' for i in stages) if stages is not None else ('',)
    blocks = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, BOTTLENECK_TYPES) and name.startswith(prefixes)]
    if not blocks:
        if any(isinstance(m, PyramidSqueezeAttention) for m in model.modules()):
            raise ValueError(f'{type(model).__name__} already has PSA layers and no plain bottleneck left to convert.')
        where = f' in stages {tuple(stages)}' if stages is not None else ''
        raise ValueError(
            f'psa_convert found no Bottleneck block{where} in {type(model).__name__}. It converts ResNet-family '
            'models built from bottlenecks (resnet50/101/152, resnet50d, resnext50_32x4d, seresnet50, ...); '
            'resnet18/34 use BasicBlock, which has no bottleneck 3x3 conv.')
    for name, block in blocks:
        conv = block.conv2
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f'{name}.conv2 is a {type(conv).__name__}, not the nn.Conv2d psa_convert replaces.')
        try:
            psa = PyramidSqueezeAttention(
                conv.in_channels, conv.out_channels, stride=conv.stride[0], dilation=conv.dilation[0],
                kernel_sizes=kernel_sizes, groups=groups, split_input=split_input, rd_ratio=rd_ratio,
                device=conv.weight.device, dtype=conv.weight.dtype)
        except ValueError as e:
            raise ValueError(f'Cannot convert {name}.conv2 ({conv}): {e}') from e
        _init_like_resnet(psa)
        block.conv2 = psa
    return model


@torch.no_grad()
def _init_like_resnet(module: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) conv weights, as timm's ResNet and the authors' code do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
