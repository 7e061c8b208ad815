"""Files written whole or not at all: ``atomic_write``.

Every file the package writes for the user (weights, exports, results, pictures, caches) is written to a
temporary file in the same folder and renamed over the target, so an interrupted write (full disk, Ctrl-C,
SIGKILL) leaves the previous version intact and no half-written file under the target's name. The finished
file gets the permissions a plain ``open(path, 'w')`` would give (the umask's), not ``mkstemp``'s 0600.
"""
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import EpsanetError

__all__ = ['FileWriteError', 'atomic_write', 'file_mode']

PathLike = Union[str, os.PathLike]


class FileWriteError(EpsanetError, OSError):
    """A file could not be written (its previous version, if any, is intact)."""


def file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: PathLike, write: Callable[[str], None], suffix: str = '.tmp') -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (named ``.<name>.<random><suffix>``; give
    ``suffix`` when the writer needs the target's extension), then rename it to ``path``.

    On any failure the temporary file is removed and ``path`` is untouched; an ``OSError`` becomes a
    :class:`FileWriteError` that says so (and names a full disk when that is the cause).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, FileWriteError):
            raise
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _write_error(path: Path, e: OSError) -> FileWriteError:
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if e.errno == errno.ENOSPC:
        reason, todo = 'the disk is full', 'Free space or choose another output path.'
    elif blocking is not None:
        reason, todo = f'{blocking} is a file, not a folder', 'Choose another output path.'
    else:
        reason, todo = e.strerror or str(e), 'Choose another output path.'
    previous = 'the previous version of it is intact' if path.is_file() else 'no previous version existed'
    return FileWriteError(f'could not write {path}: {reason}; {previous}. {todo}')


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
