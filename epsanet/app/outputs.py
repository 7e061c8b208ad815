"""The one output policy of every command that writes files.

1. **Never write onto an input.** An output file may not be a file the command reads (compared by
   device and inode, so links and ``..`` spellings are caught), and an output *folder* may not be, or
   hold, an input (``explain DIR --output-dir DIR``). :func:`check_not_input`.
2. **Never replace a file the command did not make, unless ``--overwrite``.** The rule is the simple
   one, as in ``git``: any existing file at an output path is refused without ``--overwrite``. Two
   commands recognise their own unfinished work and continue it instead: ``epsanet train --resume``
   (a run folder) and ``epsanet extract`` (its plan and chunk records). :func:`check_new`.
3. **One run per run folder.** :class:`RunFolder` holds a lock file ``.epsanet.lock`` (PID, process
   start time, host), created with ``O_EXCL``; a second run refuses and names the first run's PID. The
   lock of a process that no longer runs is taken over.
4. **An existing run folder is refused without ``--resume``**, with the command that resumes it and
   the flag that starts over (``--overwrite``). :meth:`RunFolder.claim`.
5. **A run that fails before its first step writes nothing.** :class:`RunFolder` removes the folder it
   created if nothing was written into it; the trainer writes ``args.yaml`` only after the first step.
6. **Writes are atomic**: :func:`epsanet.files.atomic_write` (a temporary file renamed over the target).

Every check runs before the work starts, and raises :class:`OutputError` (a ``ValueError``), a one-line
message naming the path and what to do.
"""
import argparse
import dataclasses
import errno
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import EpsanetError
from .flags import arg

__all__ = [
    'OutputError', 'OVERWRITE_HELP', 'overwrite_option', 'add_overwrite_argument', 'check_not_input',
    'check_not_inside', 'check_new', 'check_output_file', 'config_inputs', 'RunFolder', 'LOCK_NAME',
]

PathLike = Union[str, os.PathLike]

OVERWRITE_HELP = 'replace existing output files (without it a command refuses to replace a file it did not make)'
LOCK_NAME = '.epsanet.lock'


class OutputError(EpsanetError, ValueError):
    """An output path the policy refuses (it is an input, it exists, or a run folder is taken); the CLI exits
    with status 2, as for any other bad input."""


def overwrite_option(group: str = 'output') -> Any:
    """The ``overwrite`` field of a command's config dataclass: the flag ``--overwrite``."""
    return arg(False, OVERWRITE_HELP, group)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite`` for a command whose flags are plain argparse arguments."""
    parser.add_argument('--overwrite', action='store_true', help=OVERWRITE_HELP)


def _stat(path: PathLike) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _inputs(inputs: Iterable[Optional[PathLike]]) -> list:
    return [(str(p), s) for p in inputs if p and str(p) and (s := _stat(p)) is not None]


def check_not_input(outputs: Iterable[Optional[PathLike]], inputs: Iterable[Optional[PathLike]],
                    flag: str = '--output') -> None:
    """Refuse an output that is an input file, or an output folder that is, or holds, an input.

    ``outputs`` are the paths the command will write (files or folders; an absent one cannot be an
    input). ``inputs`` are the files and folders it reads (``None``, ``''`` and paths that do not exist,
    such as URLs and hub ids, are skipped). This check holds even with ``--overwrite``.
    """
    ins = _inputs(inputs)
    if not ins:
        return
    for out in outputs:
        if not out or not str(out):
            continue
        st = _stat(out)
        if st is None:
            continue
        for name, ist in ins:
            if _same(st, ist):
                what = 'the folder' if os.path.isdir(out) else 'the file'
                raise OutputError(f'{flag} {out} is {what} {name} that this command reads: writing there would '
                                  f'destroy it. Choose another {flag}.')
        if os.path.isdir(out):
            for name, _ in ins:
                if _inside(name, st):
                    raise OutputError(f'{flag} {out} holds the input {name}: this command must not write into a '
                                      f'folder of its inputs. Choose another {flag} (a new or empty folder).')


def check_not_inside(folders: Iterable[Optional[PathLike]], inputs: Iterable[Optional[PathLike]],
                     flag: str = '--output') -> None:
    """Refuse an output folder (existing or not) that lies inside an input folder, such as a run folder inside
    the data it trains on: its files would become part of the data. Holds even with ``--overwrite``."""
    ins = [(name, st) for name, st in _inputs(inputs) if os.path.isdir(name)]
    for out in folders:
        if not out or not str(out):
            continue
        for name, st in ins:
            if _inside(str(out), st):
                raise OutputError(f'{flag} {out} lies inside the input folder {name}: its files would become part '
                                  f'of the data. Choose another {flag} (outside {name}).')


def _inside(path: str, folder: os.stat_result) -> bool:
    """Whether ``path`` lies under the folder ``folder`` (by identity of every parent, links resolved)."""
    parent = Path(os.path.realpath(path))
    for p in parent.parents:
        st = _stat(p)
        if st is not None and _same(st, folder):
            return True
    return False


def check_new(paths: Iterable[Optional[PathLike]], overwrite: bool, flag: str = '--output') -> None:
    """Refuse to replace an existing file (or to write a file where a folder is) unless ``overwrite``."""
    for path in paths:
        if not path or not str(path):
            continue
        p = Path(path)
        if p.is_dir():
            raise OutputError(f'{flag} {p} is a folder; give a file name.')
        if (p.exists() or p.is_symlink()) and not overwrite:
            raise OutputError(f'{flag} {p} already exists and this command did not make it; pass --overwrite to '
                              f'replace it, or choose another {flag}.')
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise OutputError(f'{flag} {p}: {parent} is a file, not a folder.')


_INPUT_FIELDS = ('checkpoint', 'initial_checkpoint', 'data_dir', 'class_map')


def config_inputs(cfg: Any, *extra: Optional[PathLike]) -> list:
    """The paths a command's config reads (weights, data, class map, ``inputs``), plus ``extra``."""
    found = [getattr(cfg, name, None) for name in _INPUT_FIELDS]
    return [p for p in [*found, *(getattr(cfg, 'inputs', ()) or ()), *extra] if p]


def check_output_file(path: Optional[PathLike], inputs: Iterable[Optional[PathLike]], overwrite: bool,
                      flag: str = '--output') -> None:
    """Both checks for one output file: not an input (even with ``overwrite``), and new unless ``overwrite``."""
    if path:
        check_not_input([path], inputs, flag)
        check_new([path], overwrite, flag)


# ---- run folders --------------------------------------------------------------------------------------------------

def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    return stat.rsplit(')', 1)[-1].split()[19]


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


@dataclasses.dataclass
class _Owner:
    pid: int
    started: Optional[str]
    host: str

    @classmethod
    def me(cls) -> '_Owner':
        return cls(os.getpid(), _start_time(os.getpid()), socket.gethostname())

    @classmethod
    def read(cls, path: Path) -> Optional['_Owner']:
        try:
            fields = dict(line.split('=', 1) for line in path.read_text().splitlines() if '=' in line)
            return cls(int(fields['pid']), fields.get('started') or None, fields.get('host', ''))
        except (OSError, KeyError, ValueError):
            return None

    def text(self) -> str:
        return f'pid={self.pid}\nstarted={self.started or ""}\nhost={self.host}\n'

    def running(self) -> bool:
        return self.host != socket.gethostname() or _alive(self.pid, self.started)


class RunFolder:
    """A training run's folder, held for the life of a run (``with RunFolder(path).claim(...)``).

    :meth:`claim` checks the folder (see the module docstring), creates it if needed and takes the lock;
    leaving the ``with`` block releases the lock and removes the folder again if this run created it and
    wrote nothing into it.
    """

    def __init__(self, path: PathLike, flag: str = 'the output'):
        self.path = Path(path)
        self.flag = flag  # the command's name for the folder, e.g. train's '--output'
        self.lock = self.path / LOCK_NAME
        self.created = False
        self.held = False

    def contents(self) -> list:
        """The names in the folder other than the lock (and the temporary files of a killed write)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)

    def claim(self, resume: bool, overwrite: bool, resume_command: Optional[str] = None) -> 'RunFolder':
        """Check and lock the folder.

        An existing file is refused; a folder with files is refused unless ``resume`` (continue the run
        there) or ``overwrite`` (start over: the new run replaces the old one's files as it writes them).
        ``resume_command``, when the folder holds a resumable run, is the command the refusal names.
        """
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError(f'{self.flag} {p} is a file, not a run folder; choose a new folder name.')
        self._take_lock()
        try:
            names = self.contents()
            if names and not resume and not overwrite:
                raise OutputError(self._refusal(names, resume_command))
        except BaseException:
            self.release()
            raise
        return self

    def _refusal(self, names: Sequence[str], resume_command: Optional[str]) -> str:
        p = self.path
        listing = f'{", ".join(names[:4])}{", ..." if len(names) > 4 else ""}'
        if resume_command:
            return (f'{p} already holds a run ({listing}). Resume it with: {resume_command}   (or the same command '
                    f'plus --resume auto); start over in it with --overwrite; or choose another {self.flag}.')
        return (f'{p} already exists and holds files ({listing}) but no run to resume; choose a new or empty '
                f'{self.flag}, or pass --overwrite to write the run into it (replacing its files of the same names).')

    def _take_lock(self) -> None:
        try:
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f'cannot create the run folder {self.path}: {e.strerror or e}.') from e
        me = _Owner.me()
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_stale()
                continue
            except OSError as e:
                self._remove_created()
                raise OutputError(f'cannot lock the run folder {self.path}: {e.strerror or e}.') from e
            with os.fdopen(fd, 'w') as f:
                f.write(me.text())
            self.held = True
            return
        raise OutputError(f'cannot lock the run folder {self.path}: {self.lock} keeps reappearing.')

    def _take_over_stale(self) -> None:
        """Remove the lock if its process is gone; else refuse, naming it. Moving the lock aside before
        reading it again makes two runs that both found the same stale lock take it over only once."""
        owner = _Owner.read(self.lock)
        if owner is not None and owner.running():
            where = '' if owner.host == socket.gethostname() else f' on {owner.host}'
            raise OutputError(f'{self.path} is in use by another run (PID {owner.pid}{where}, lock file '
                              f'{self.lock}); wait for it to finish, or choose another {self.flag}.')
        aside = self.lock.with_name(f'{LOCK_NAME}.stale.{os.getpid()}')
        try:
            os.rename(self.lock, aside)
        except FileNotFoundError:
            return  # another run removed it first; try to create it again
        moved = _Owner.read(aside)
        if moved is not None and owner is not None and moved != owner and moved.running():
            try:  # we moved a fresh lock another run had just taken: put it back
                os.link(aside, self.lock)
            except OSError:
                pass
        os.unlink(aside)

    def release(self) -> None:
        if self.held:
            owner = _Owner.read(self.lock)
            if owner is not None and owner.pid == os.getpid():
                try:
                    os.unlink(self.lock)
                except FileNotFoundError:
                    pass
            self.held = False
        self._remove_created()

    def _remove_created(self) -> None:
        if self.created and not self.contents():
            try:
                os.rmdir(self.path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                    raise
            self.created = False

    def __enter__(self) -> 'RunFolder':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
