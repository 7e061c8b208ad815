"""Errors the commands and their Python API raise for problems a user can fix, and the one line a user sees
for any error (:func:`error_message`)."""
import errno

from ..errors import EpsanetError

__all__ = ['TrainError', 'ConfigError', 'CheckpointError', 'NonFiniteLossError', 'error_message', 'os_error_message']


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


_OS_CAUSES = {
    errno.ENOSPC: 'no space left on the device (the disk is full)',
    errno.EDQUOT: 'the disk quota is exceeded',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted',
    errno.EROFS: 'the file system is read-only',
    errno.ENOTDIR: 'a part of the path is a file, not a folder',
    errno.EISDIR: 'it is a folder, not a file',
    errno.EEXIST: 'it already exists',
    errno.ENOENT: 'it does not exist',
    errno.ECONNREFUSED: 'the connection was refused (is the server running, is the network up?)',
    errno.EHOSTUNREACH: 'the host is unreachable (no network?)',
    errno.ENETUNREACH: 'the network is unreachable',
    errno.ETIMEDOUT: 'the connection timed out',
}


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), '')


def os_error_message(e: OSError) -> str:
    """One line naming the path (or host) and the cause of an OS or network error, e.g.
    ``/data/run/best.safetensors: no space left on the device (the disk is full)``."""
    cause = _OS_CAUSES.get(e.errno) or e.strerror or _first_line(str(e)) or type(e).__name__
    where = ' -> '.join(str(p) for p in (e.filename, e.filename2) if p is not None)
    if not where and isinstance(getattr(e, 'reason', None), OSError):  # urllib's URLError wraps the socket error
        return os_error_message(e.reason)
    return f'{where}: {cause}' if where else cause


def error_message(e: BaseException) -> str:
    """The one line a user sees for ``e``: the package's own message, an OS error's path and cause, or the first
    line of any other error with its type (the traceback is shown only with ``EPSANET_DEBUG=1``)."""
    if isinstance(e, EpsanetError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    name = type(e).__name__
    if name == 'HFValidationError':  # huggingface_hub: an invalid repo id
        return f'invalid Hugging Face repo id: {_first_line(str(e))}'
    cause = e.__cause__ or e.__context__
    if 'Connect' in name and isinstance(cause, OSError):
        return os_error_message(cause)
    return f'{name}: {_first_line(str(e))} (set EPSANET_DEBUG=1 to see the traceback)'
