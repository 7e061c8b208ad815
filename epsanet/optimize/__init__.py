"""CPU speed as explicit transforms of the plain model (see :mod:`epsanet.optimize.transforms`)."""
from .fast_psa import FastPSA
from .fold_bn import fold_batchnorm
from .transforms import is_optimized, optimize_for_inference, optimize_for_training
from .tuned_conv import TunedConv2d

__all__ = [
    'FastPSA', 'TunedConv2d', 'fold_batchnorm', 'is_optimized', 'optimize_for_inference', 'optimize_for_training',
]
