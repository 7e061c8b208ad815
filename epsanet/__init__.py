"""EPSANet for PyTorch and timm.

``import epsanet`` registers ``epsanet50``, ``epsanet50_large``, ``epsanet101`` and
``epsanet101_large`` with timm, so ``timm.create_model("epsanet50")`` works.
"""
from .convert_resnet import psa_convert
from .layers import PSA, PSAGate, PyramidSqueezeAttention
from .layers.fold_bn import optimize_for_inference
from .models import (
    EPSANet,
    PSABottleneck,
    checkpoint_filter_fn,
    epsanet50,
    epsanet50_large,
    epsanet101,
    epsanet101_large,
)

__version__ = '0.1.0'

MODEL_NAMES = ('epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large')

__all__ = [
    'EPSANet', 'MODEL_NAMES', 'PSA', 'PSABottleneck', 'PSAGate', 'PyramidSqueezeAttention', 'checkpoint_filter_fn',
    'epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large', 'optimize_for_inference', 'psa_convert',
]
