"""Fine-tuning and validation: the Python API behind ``epsanet train`` and ``epsanet validate``."""
from .config import TrainConfig
from .interrupt import Interrupted
from .loop import Callback, TrainResult, train
from .validate import ValidateConfig, evaluate, validate

__all__ = ['Callback', 'Interrupted', 'TrainConfig', 'TrainResult', 'ValidateConfig', 'evaluate', 'train', 'validate']
