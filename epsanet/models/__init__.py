"""EPSANet models; importing this module registers them with timm."""
from .epsanet import (
    EPSANet,
    PSABottleneck,
    checkpoint_filter_fn,
    epsanet50,
    epsanet50_large,
    epsanet101,
    epsanet101_large,
)

__all__ = [
    'EPSANet', 'PSABottleneck', 'checkpoint_filter_fn',
    'epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large',
]
