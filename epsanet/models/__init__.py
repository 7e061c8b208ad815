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
from .variants import LARGE_PSA, SMALL_PSA, VARIANTS, Variant, get_variant, infer_variant, model_names

__all__ = [
    'EPSANet', 'LARGE_PSA', 'PSABottleneck', 'SMALL_PSA', 'VARIANTS', 'Variant', 'checkpoint_filter_fn',
    'epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large', 'get_variant', 'infer_variant', 'model_names',
]
