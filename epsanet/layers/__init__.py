"""Reusable layers: the PSA layer works inside any network."""
from .psa import PSA, PSAGate, PyramidSqueezeAttention

__all__ = ['PSA', 'PSAGate', 'PyramidSqueezeAttention']
