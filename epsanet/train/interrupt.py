"""Stopping a training run cleanly on SIGINT (Ctrl-C), SIGTERM (preemption) and SIGUSR1 (SLURM's warning).

:class:`GracefulStop` installs the signal handlers while a run is active. Inside a *deferred*
section (the training steps, the end of an epoch, a checkpoint write) a signal only records a stop
request: the loop finishes the current step, saves the exact position and raises
:class:`Interrupted`. Outside (set-up, validation, which change no training state) the handler
raises :class:`Interrupted` at once. Either way the process ends within ``grace_period`` seconds of
the first signal: if saving has not finished by then (a collective waiting for a dead rank, a hung
file system), a watchdog thread ends the process with the same exit code, keeping the last saved
state. Later signals while stopping are logged and otherwise ignored (under torchrun, Ctrl-C
reaches a worker twice: from the terminal and forwarded by torchrun). DataLoader workers ignore the
signals (:func:`protect_workers`): a Ctrl-C or a SIGTERM sent to the whole process group (a terminal,
``timeout``, SLURM) must not kill the workers the main process still reads from until it stops.
PyTorch's own SIGTERM handler in a worker exits at once unless the parent sent it.

The exit code of a stopped run is ``128 + signal number``, what a shell reports for a process
killed by that signal: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1 (Linux numbering).
"""
import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader

__all__ = ['GracefulStop', 'Interrupted', 'STOP_SIGNALS', 'exit_code', 'signal_name', 'pause_point', 'protect_workers']

_logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(getattr(signal, n) for n in ('SIGINT', 'SIGTERM', 'SIGUSR1') if hasattr(signal, n))


class _IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: the worker ignores :data:`STOP_SIGNALS`, then runs the loader's own."""

    def __init__(self, inner: Optional[Callable[[int], None]]):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def protect_workers(loader: Any) -> None:
    """Make the workers of ``loader`` (a DataLoader, or timm's PrefetchLoader around one) ignore the stop
    signals, so that only the main process reacts to them; it ends the workers itself when it stops."""
    inner = getattr(loader, 'loader', loader)
    if isinstance(inner, DataLoader) and inner.num_workers > 0 and not isinstance(inner.worker_init_fn,
                                                                                  _IgnoreStopSignals):
        inner.worker_init_fn = _IgnoreStopSignals(inner.worker_init_fn)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: ``128 + signum`` (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f'signal {signum}'


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; a ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too.

    ``signum`` is the signal, ``state`` the resumable state file written for the stop (``None`` when
    nothing new was saved), ``exit_code`` the process exit status the CLI returns.
    """

    def __init__(self, signum: int, message: str = '', state: Optional[Path] = None):
        super().__init__(message or f'stopped by {signal_name(signum)}')
        self.signum = int(signum)
        self.state = state
        self.reported = False  # the trainer logged what was saved and how to resume

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


_active: Optional['GracefulStop'] = None


class GracefulStop:
    """Context manager: SIGINT/SIGTERM/SIGUSR1 become a stop request (see the module docstring).

    ``deferred`` (an attribute, ``False`` at first) says whether a signal waits for :meth:`requested`
    to be polled; :meth:`immediate` turns it off for a block. ``last_saved`` names the newest saved
    state for the grace-period message. Handlers are only installed from the main thread; elsewhere
    signals keep Python's default behaviour.
    """

    def __init__(self, grace_period: float = 25.0):
        self.grace_period = float(grace_period)
        self.signum: Optional[int] = None
        self.deferred = False
        self.last_saved: Optional[Path] = None
        self._previous = {}
        self._timer: Optional[threading.Timer] = None
        self._pid = os.getpid()

    def __enter__(self) -> 'GracefulStop':
        global _active
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
        if _active is self:
            _active = None

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides when to stop
            return
        name = signal_name(signum)
        if self.signum is not None:
            _logger.warning('%s received while stopping: still saving; the run ends within %g s of the first signal '
                            '(--grace-period).', name, self.grace_period)
            return
        self.signum = signum
        self._timer = threading.Timer(self.grace_period, self._expire)
        self._timer.daemon = True
        self._timer.start()
        if not self.deferred:
            raise Interrupted(signum)
        _logger.warning('%s received: saving the exact position after the current step (at most %g s, '
                        '--grace-period).', name, self.grace_period)

    def _expire(self) -> None:
        last = (f'the last saved state is {self.last_saved}: resume with --resume auto (or --resume '
                f'{self.last_saved}); the steps after it are redone' if self.last_saved else 'no state was saved')
        _logger.error('could not save within the grace period of %g s after %s (--grace-period); exiting without '
                      'saving: %s.', self.grace_period, signal_name(self.signum), last)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(exit_code(self.signum))

    def requested(self) -> Optional[int]:
        """The signal that asked to stop, or ``None``."""
        return self.signum

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """Within this block a signal raises at once (a request already pending raises on entry)."""
        was, self.deferred = self.deferred, False
        try:
            if self.signum is not None:
                raise Interrupted(self.signum)
            yield
        finally:
            self.deferred = was


# ---- test hook -------------------------------------------------------------------------------------------------
# Tests need the real signal to arrive at an exact point of a real run (a given step, during validation, inside a
# checkpoint write). With EPSANET_TEST_PAUSE_AT="<point>:<n>[@<rank>]" and EPSANET_TEST_PAUSE_FILE=<path>, the n-th
# time the process reaches <point> it writes its pid to <path> and waits (up to 120 s) until a stop signal is
# handled; the test then sends the signal from outside. It fires once per <path>, so a restarted process (torchrun
# --max-restarts) runs through. Points: "setup", "step" (after an optimizer step), "validate", "state-write" (the
# state file is written, not yet renamed into place).

_PAUSE_AT, _PAUSE_FILE = 'EPSANET_TEST_PAUSE_AT', 'EPSANET_TEST_PAUSE_FILE'
_reached = collections.Counter()


def pause_point(name: str) -> None:
    """Test hook (a no-op unless ``EPSANET_TEST_PAUSE_AT`` is set): see the comment above."""
    spec = os.environ.get(_PAUSE_AT)
    if not spec:
        return
    where, _, rank = spec.partition('@')
    point, _, count = where.partition(':')
    if point != name or (rank and rank != os.environ.get('RANK', '0')):
        return
    _reached[name] += 1
    marker = Path(os.environ[_PAUSE_FILE])
    if _reached[name] != int(count or 1) or marker.exists():
        return
    tmp = marker.with_name(marker.name + '.tmp')
    tmp.write_text(str(os.getpid()))
    tmp.replace(marker)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (_active is None or _active.signum is None):
        time.sleep(0.01)
