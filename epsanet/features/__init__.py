"""Feature extraction at scale (``epsanet extract``) and reading the result back (:func:`load`).

``extract(ExtractConfig(data_dir=..., output=...))`` streams embeddings to disk (sharded
safetensors with an ``index.json``, or one ``.npy`` per output), in one or several processes
(``torchrun``), resumable after an interruption. ``load(output)`` opens the result lazily.
"""
from .config import ExtractConfig, parse_size
from .extract import build_dataset, extract
from .reader import Features, load

__all__ = ['ExtractConfig', 'Features', 'build_dataset', 'extract', 'load', 'parse_size']
