"""torchvision DeepLabV3 on a dilated EPSANet (output stride 8 or 16).

The backbone is timm's ``features_only`` model with the last stages dilated by timm's
``output_stride``; its ``layer4`` feeds torchvision's ``DeepLabHead`` (ASPP) and, with
``aux_loss``, ``layer3`` feeds an ``FCNHead``, as in torchvision's ``deeplabv3_resnet50``.

Example::

    from epsanet.downstream import deeplabv3_epsanet
    model = deeplabv3_epsanet('epsanet50', num_classes=21, output_stride=8)
    out = model(images)['out']  # [N, 21, H, W]
"""
from typing import Any, Optional

from timm.layers import freeze_batch_norm_2d
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from .backbone import Weights, create_backbone

__all__ = ['deeplabv3_epsanet']


def deeplabv3_epsanet(
        model_name: str = 'epsanet50',
        *,
        num_classes: int = 21,
        output_stride: int = 8,
        aux_loss: bool = False,
        weights_backbone: Weights = None,
        frozen_bn: bool = False,
        **kwargs: Any,
) -> DeepLabV3:
    """DeepLabV3 with a dilated EPSANet backbone.

    Args:
        model_name: timm model of the backbone (``epsanet50``, ``epsanet101_large``, ...).
        num_classes: segmentation classes.
        output_stride: 8 (``layer3`` and ``layer4`` dilated) or 16 (``layer4`` dilated).
        aux_loss: add torchvision's auxiliary ``FCNHead`` on ``layer3`` (output key ``"aux"``).
        weights_backbone: backbone weights: file, URL, ``hf-hub:`` id, state dict, or ``True``.
        frozen_bn: turn the backbone's BatchNorm layers into ``FrozenBatchNorm2d``
            (torchvision's DeepLabV3 trains them, so the default is ``False``).
        **kwargs: passed to ``timm.create_model``.
    """
    if output_stride not in (8, 16):
        raise ValueError(f'DeepLabV3 needs output_stride 8 or 16, got {output_stride}.')
    out_indices, out_map = ((3, 4), ('aux', 'out')) if aux_loss else ((4,), ('out',))
    backbone = create_backbone(
        model_name, weights_backbone, features_only=True, feature_cls='dict', out_indices=out_indices,
        feature_cfg=dict(out_map=out_map), output_stride=output_stride, **kwargs)
    if frozen_bn:
        backbone = freeze_batch_norm_2d(backbone)
    channels = backbone.feature_info.channels()
    classifier = DeepLabHead(channels[-1], num_classes)
    aux_classifier: Optional[FCNHead] = FCNHead(channels[0], num_classes) if aux_loss else None
    return DeepLabV3(backbone, classifier, aux_classifier)
