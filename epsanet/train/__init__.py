"""Fine-tuning and validation: the Python API behind ``epsanet train`` and ``epsanet validate``."""
from .checkpoint import read_weights_metadata
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, NonFiniteLossError, TrainError
from .factory import build_model
from .flags import parse_config
from .interrupt import Interrupted
from .loop import Callback, TrainResult, train
from .validate import ValidateConfig, evaluate, validate

__all__ = [
    'Callback', 'CheckpointError', 'ConfigError', 'Interrupted', 'NonFiniteLossError', 'TrainConfig', 'TrainError',
    'TrainResult', 'ValidateConfig', 'build_model', 'evaluate', 'parse_config', 'read_weights_metadata', 'train',
    'validate',
]
