"""EPSANet for PyTorch and timm.

``import epsanet`` registers ``epsanet50``, ``epsanet50_large``, ``epsanet101`` and
``epsanet101_large`` with timm, so ``timm.create_model("epsanet50")`` works.
"""
from . import _compat  # noqa: F401  (first: below the torch/torchvision/timm floors, import stops here in one line)
from .convert_resnet import psa_convert
from .errors import EpsanetError
from .layers import PSA, PSAGate, PyramidSqueezeAttention
from .models import (
    EPSANet,
    PSABottleneck,
    checkpoint_filter_fn,
    epsanet50,
    epsanet50_large,
    epsanet101,
    epsanet101_large,
    model_names,
)
from .optimize import optimize_for_inference, optimize_for_training

__version__ = '0.1.0'


def __getattr__(name: str):
    if name == 'MODEL_NAMES':  # read from the variant table each time (epsanet.models.variants.VARIANTS)
        return model_names()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'EPSANet', 'EpsanetError', 'MODEL_NAMES', 'PSA', 'PSABottleneck', 'PSAGate', 'PyramidSqueezeAttention',
    'checkpoint_filter_fn', 'epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large',
    'optimize_for_inference', 'optimize_for_training', 'psa_convert',
]
