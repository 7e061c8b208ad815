"""torchvision Faster R-CNN, Mask R-CNN and RetinaNet on an EPSANet + FPN backbone.

The builders mirror torchvision's ``fasterrcnn_resnet50_fpn`` & co.: same ``num_classes``,
``weights_backbone`` and ``trainable_backbone_layers`` arguments, frozen BatchNorm when the
backbone is pretrained, and every other keyword goes to the torchvision model class (e.g.
``min_size``, ``max_size``, ``box_detections_per_img``). The images are normalised with the
backbone's ``pretrained_cfg`` mean and std unless ``image_mean``/``image_std`` are given.

Example::

    from epsanet.downstream import fasterrcnn_epsanet_fpn
    model = fasterrcnn_epsanet_fpn('epsanet50', num_classes=3, weights_backbone='epsanet50.safetensors')
"""
from typing import Any, Dict, Optional

from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .backbone import Weights, epsanet_fpn_backbone

__all__ = ['fasterrcnn_epsanet_fpn', 'maskrcnn_epsanet_fpn', 'retinanet_epsanet_fpn']


def _detector(detector_cls, model_name, num_classes, weights, trainable_layers, frozen_bn, backbone_kwargs,
              detector_kwargs, **fpn_kwargs):
    """``detector_cls`` on an EPSANet + FPN backbone, normalising images with the backbone's mean/std."""
    backbone = epsanet_fpn_backbone(
        model_name, weights, trainable_layers, frozen_bn, **fpn_kwargs, **(backbone_kwargs or {}))
    cfg = getattr(backbone, 'pretrained_cfg', None) or {}
    defaults = {'image_mean': list(cfg['mean']), 'image_std': list(cfg['std'])} if 'mean' in cfg else {}
    return detector_cls(backbone, num_classes=num_classes, **{**defaults, **detector_kwargs})


def fasterrcnn_epsanet_fpn(
        model_name: str = 'epsanet50',
        *,
        num_classes: int = 91,
        weights_backbone: Weights = None,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with an EPSANet + FPN backbone (stages 1-4, strides 4-32, plus P6 by pooling).

    Args:
        model_name: timm model of the backbone (``epsanet50``, ``epsanet101_large``, ...).
        num_classes: classes including the background.
        weights_backbone: backbone weights: file, URL, ``hf-hub:`` id, state dict, or ``True``
            for the model's registered tag.
        trainable_backbone_layers: 0-5 stages to train; default 3 with weights, else 5.
        frozen_bn: FrozenBatchNorm2d in the backbone; default ``True`` with weights, else ``False``.
        backbone_kwargs: extra ``timm.create_model`` arguments.
        **kwargs: torchvision ``FasterRCNN`` arguments.
    """
    return _detector(FasterRCNN, model_name, num_classes, weights_backbone, trainable_backbone_layers, frozen_bn,
                     backbone_kwargs, kwargs)


def maskrcnn_epsanet_fpn(
        model_name: str = 'epsanet50',
        *,
        num_classes: int = 91,
        weights_backbone: Weights = None,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with an EPSANet + FPN backbone; arguments as :func:`fasterrcnn_epsanet_fpn`."""
    return _detector(MaskRCNN, model_name, num_classes, weights_backbone, trainable_backbone_layers, frozen_bn,
                     backbone_kwargs, kwargs)


def retinanet_epsanet_fpn(
        model_name: str = 'epsanet50',
        *,
        num_classes: int = 91,
        weights_backbone: Weights = None,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> RetinaNet:
    """RetinaNet with an EPSANet + FPN backbone: P3-P5 from stages 2-4 plus P6/P7, as torchvision's
    ``retinanet_resnet50_fpn``. Arguments as :func:`fasterrcnn_epsanet_fpn` (no background class
    is needed in ``num_classes``)."""
    return _detector(RetinaNet, model_name, num_classes, weights_backbone, trainable_backbone_layers, frozen_bn,
                     backbone_kwargs, kwargs, returned_layers=(2, 3, 4), extra_blocks=LastLevelP6P7(256, 256))
