"""CPU speed as explicit transforms of the plain model (see :mod:`epsanet.optimize.transforms`)."""
from .autotune import cache_info, clear_cache, cpu_signature
from .fast_psa import FastPSA
from .fold_bn import fold_batchnorm
from .fused_bn_act import FusedBatchNorm2d, fuse_batchnorm_act, unfuse_batchnorm_act
from .transforms import is_optimized, optimize_for_inference, optimize_for_training
from .tuned_conv import TunedConv2d

__all__ = [
    'FastPSA', 'FusedBatchNorm2d', 'TunedConv2d', 'cache_info', 'clear_cache', 'cpu_signature', 'fold_batchnorm',
    'fuse_batchnorm_act', 'is_optimized', 'optimize_for_inference', 'optimize_for_training', 'unfuse_batchnorm_act',
]
