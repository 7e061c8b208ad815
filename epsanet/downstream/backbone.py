"""EPSANet (or any timm ResNet-family) backbones for torchvision's detection models.

:func:`create_backbone` builds a timm model and loads its weights through timm's
``pretrained_cfg_overlay``; :func:`epsanet_fpn_backbone` wraps it in torchvision's
``BackboneWithFPN`` with the same ``trainable_layers`` and frozen-BatchNorm rules as
torchvision's ``resnet_fpn_backbone``.
"""
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.utils import freeze
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ..weights.loading import weights_overlay

__all__ = ['Weights', 'pretrained_overlay', 'create_backbone', 'epsanet_fpn_backbone', 'freeze_stages']

Weights = Union[None, bool, str, os.PathLike, Mapping[str, torch.Tensor]]

# parameter-holding modules of a timm ResNet from the input up, as torchvision counts trainable layers
_STAGES = ('conv1', 'layer1', 'layer2', 'layer3', 'layer4')


def pretrained_overlay(weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, Any]:
    """timm ``pretrained_cfg_overlay`` for ``weights``: :func:`epsanet.weights.loading.weights_overlay`."""
    return weights_overlay(weights)


def create_backbone(model_name: str = 'epsanet50', weights: Weights = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` with weights from :func:`pretrained_overlay`.

    ``weights``: ``None``/``False`` (random init), ``True`` (the model's registered pretrained tag,
    e.g. ``model_name="epsanet50.in1k"``), or a file, URL, ``hf-hub:`` id or state dict.
    The classifier of the checkpoint is dropped when ``num_classes`` differs (timm's rule).
    """
    import epsanet  # noqa: F401  (registers the EPSANet models with timm)

    pretrained = weights is not None and weights is not False
    if pretrained and weights is not True:
        kwargs['pretrained_cfg_overlay'] = {**pretrained_overlay(weights), **kwargs.get('pretrained_cfg_overlay', {})}
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def freeze_stages(model: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` (0-5) stages, counting as torchvision does.

    ``5`` trains everything, ``3`` (torchvision's default with pretrained weights) trains
    ``layer2``-``layer4``, ``0`` freezes the whole backbone. Parameters of frozen stages stop
    requiring grad; BatchNorm layers are left as they are (see ``frozen_bn``).
    """
    if not 0 <= trainable_layers <= len(_STAGES):
        raise ValueError(f'trainable_layers must be between 0 and {len(_STAGES)}, got {trainable_layers}.')
    missing = [s for s in _STAGES if not hasattr(model, s)]
    if missing:
        raise ValueError(
            f'{type(model).__name__} has no {missing}: trainable_layers needs a ResNet-family model with '
            f'stages {list(_STAGES)}.')
    frozen = list(_STAGES[:len(_STAGES) - trainable_layers])
    if 'conv1' in frozen:
        frozen.insert(1, 'bn1')
    if frozen:
        freeze(model, frozen, include_bn_running_stats=False)


def epsanet_fpn_backbone(
        model_name: str = 'epsanet50',
        weights: Weights = None,
        trainable_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        extra_blocks: Optional[ExtraFPNBlock] = None,
        out_channels: int = 256,
        norm_layer: Optional[type] = None,
        **kwargs: Any,
) -> BackboneWithFPN:
    """An EPSANet + FPN backbone for torchvision's detectors (``backbone.out_channels`` set).

    Args:
        model_name: a timm ResNet-family model, ``epsanet50`` by default.
        weights: backbone weights, see :func:`create_backbone`.
        trainable_layers: stages to train, 0-5 counted from ``layer4`` down (see
            :func:`freeze_stages`); default 3 with weights and 5 without, as in torchvision.
        frozen_bn: turn every BatchNorm into torchvision's ``FrozenBatchNorm2d``; default
            ``True`` with weights and ``False`` without, as in torchvision.
        returned_layers: stages (1-4, strides 4-32) that feed the FPN.
        extra_blocks: extra FPN levels, ``LastLevelMaxPool`` (P6 by pooling) by default.
        out_channels: FPN width.
        norm_layer: norm layer inside the FPN (torchvision's argument).
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    The backbone keeps the timm model's ``pretrained_cfg`` (mean, std) as ``pretrained_cfg``.
    """
    pretrained = weights is not None and weights is not False
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    if frozen_bn is None:
        frozen_bn = pretrained
    if not returned_layers or any(i not in (1, 2, 3, 4) for i in returned_layers):
        raise ValueError(f'returned_layers must be a non-empty subset of (1, 2, 3, 4), got {tuple(returned_layers)}.')

    model = create_backbone(model_name, weights, **kwargs)
    if frozen_bn:
        model = freeze_batch_norm_2d(model)
    freeze_stages(model, trainable_layers)

    stages = {info['module']: info['num_chs'] for info in model.feature_info}
    names = [f'layer{i}' for i in returned_layers]
    if any(n not in stages for n in names):
        raise ValueError(
            f'{model_name} does not expose stages {names} as top-level modules (its feature_info lists '
            f'{list(stages)}): use a timm ResNet-family model.')
    backbone = BackboneWithFPN(
        model,
        return_layers={n: str(i) for i, n in enumerate(names)},
        in_channels_list=[stages[n] for n in names],
        out_channels=out_channels,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
        norm_layer=norm_layer,
    )
    backbone.pretrained_cfg = model.pretrained_cfg
    return backbone
