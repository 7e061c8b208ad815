"""BatchNorm folding for EPSANet inference (part of :func:`epsanet.optimize_for_inference`).

In eval mode a BatchNorm is a fixed per-channel affine map, so a conv followed directly by a
BN equals one conv with scaled weights and a bias. EPSANet folds every such pair: the stem,
``conv1/bn1`` and ``conv3/bn3`` of each block and the shortcut's conv/BN. The BN after PSA
(``bn2``) stays: the attention sits between it and the branch convs. Outputs match the unfolded model
within float rounding (about 1e-6 relative); training needs the unfolded model.
"""
from typing import Tuple

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ['fold_batchnorm']

_PAIRS: Tuple[Tuple[str, str], ...] = (('conv1', 'bn1'), ('conv3', 'bn3'))


def _is_fixed_affine(bn: nn.Module, channels: int) -> bool:
    """A plain BatchNorm2d over ``channels`` whose eval-mode map is fixed (running statistics)."""
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == channels)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and _is_fixed_affine(bn, conv.out_channels)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold the conv -> BN pairs of an EPSANet (timm ``ResNet`` with PSA blocks) in place; returns it.

    Raises:
        ValueError: if ``model`` is in training mode (batch statistics cannot be folded).
    """
    from ..models.epsanet import PSABottleneck

    if model.training:
        raise ValueError('fold_batchnorm needs an eval-mode model: call model.eval() first.')
    for module in model.modules():
        if isinstance(module, PSABottleneck) or module is model:
            for conv_name, bn_name in _PAIRS:
                conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
                if conv is not None and bn is not None and _foldable(conv, bn):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, nn.Identity())
        if isinstance(module, PSABottleneck) and isinstance(module.downsample, nn.Sequential):
            ds = module.downsample
            if len(ds) == 2 and _foldable(ds[0], ds[1]):
                module.downsample = nn.Sequential(fuse_conv_bn_eval(ds[0], ds[1]), nn.Identity())
    return model
