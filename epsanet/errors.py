"""The base of every error this package raises on purpose: ``except epsanet.EpsanetError`` catches
them all. Each subclass also derives from the built-in error a caller would expect (``ValueError``
for bad input, ``RuntimeError`` for a failed operation), and each message says what was wrong and
what to do."""

__all__ = ['EpsanetError']


class EpsanetError(Exception):
    """Base class of the package's errors (weights, registry, data, training, export, CLI)."""
