"""EPSANet as a backbone for torchvision's detection and segmentation models."""
from .backbone import create_backbone, epsanet_fpn_backbone, freeze_stages, pretrained_overlay
from .detection import fasterrcnn_epsanet_fpn, maskrcnn_epsanet_fpn, retinanet_epsanet_fpn
from .segmentation import deeplabv3_epsanet

__all__ = [
    'create_backbone', 'deeplabv3_epsanet', 'epsanet_fpn_backbone', 'fasterrcnn_epsanet_fpn', 'freeze_stages',
    'maskrcnn_epsanet_fpn', 'pretrained_overlay', 'retinanet_epsanet_fpn',
]
