"""EPSANet weights: the registry of weights that exist, safe loading, conversion and publishing.

``import epsanet.weights`` is light (registry and loaders). ``epsanet.weights.convert`` and
``epsanet.weights.publish`` hold the ``epsanet convert`` / ``epsanet push`` back ends.
"""
from .loading import (
    NoPretrainedWeightsError,
    UnsafeCheckpointError,
    WeightsDownloadError,
    WeightsError,
    WeightsIntegrityError,
    create_pretrained,
    download_from_hub,
    download_url,
    read_checkpoint,
    read_state_dict,
    sha256_file,
    weights_overlay,
)
from .registry import RegistryError, WeightEntry, cfg_problems, find_entry, load_registry, registered_weights

__all__ = [
    'NoPretrainedWeightsError', 'RegistryError', 'UnsafeCheckpointError', 'WeightEntry', 'WeightsDownloadError',
    'WeightsError', 'WeightsIntegrityError', 'cfg_problems', 'create_pretrained', 'download_from_hub', 'download_url',
    'find_entry', 'load_registry', 'read_checkpoint', 'read_state_dict', 'registered_weights', 'sha256_file',
    'weights_overlay',
]
