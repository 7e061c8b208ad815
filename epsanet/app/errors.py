"""Errors the training, validation and extraction APIs raise for problems a user can fix."""

from ..errors import EpsanetError

__all__ = ['TrainError', 'ConfigError', 'CheckpointError', 'NonFiniteLossError']


class TrainError(EpsanetError):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(TrainError, ValueError):
    """A flag or config-file value is invalid."""


class CheckpointError(TrainError):
    """A checkpoint cannot be read, does not fit the model, or cannot be written."""


class NonFiniteLossError(TrainError, FloatingPointError):
    """The loss became NaN or inf."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
