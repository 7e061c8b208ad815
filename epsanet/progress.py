"""Progress reporting that suits where the output goes.

On a terminal, :func:`progress` is a ``tqdm`` bar. When stderr is a file or a pipe (``train.log``,
a cluster job's log, CI), tqdm's carriage-return updates make one unreadable line; there
:func:`progress` writes plain log lines instead, one every ``log_interval`` seconds and one at the
end, e.g. ``epoch 3/10: 120/400 (30%) 42.1 img/s, eta 6s, loss=0.412``.

Both forms share the small part of tqdm's interface the project uses: iteration, ``update``,
``set_postfix``, ``close`` and use as a context manager.
"""
import logging
import math
import sys
import time
from typing import Any, Dict, Iterable, Iterator, Optional

from tqdm import tqdm

__all__ = ['progress', 'LogProgress', 'is_terminal']

_logger = logging.getLogger('epsanet.progress')

DEFAULT_LOG_INTERVAL = 30.0


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``, where progress goes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, 'isatty', None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LogProgress:
    """Plain log lines instead of a bar: one every ``log_interval`` seconds, and one at the end.

    Args:
        iterable: what to iterate over (or None, and call :meth:`update`).
        total: the number of items (taken from ``len(iterable)`` when it has one).
        desc: what is progressing, e.g. ``"epoch 1/10"``.
        unit: the item's name in rates, e.g. ``"img"``.
        log_interval: seconds between lines; 0 logs every update.
        logger: where the lines go (default: the ``epsanet.progress`` logger, INFO).
    """

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = '',
                 unit: str = 'it', log_interval: float = DEFAULT_LOG_INTERVAL,
                 logger: Optional[logging.Logger] = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, '__len__'):
            total = len(iterable)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.log_interval = log_interval
        self.logger = logger or _logger
        self.n = 0
        self.postfix: Dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._logged_n = 0  # n at the last line written
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError('LogProgress was created without an iterable: call update() instead.')
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> 'LogProgress':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.log_interval:
            self._last, self._logged_n = now, self.n
            self.logger.info(self.line())

    def set_postfix(self, ordered_dict: Optional[Dict[str, Any]] = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def line(self) -> str:
        """The current state as one line."""
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f'{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)' if self.total else f'{self.n}'
        parts = [f'{self.desc}: {done}' if self.desc else done, f'{rate:.3g} {self.unit}/s']
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f'eta {_duration((self.total - self.n) / rate)}')
        else:
            parts.append(f'elapsed {_duration(elapsed)}')
        if self.postfix:
            parts.append(', '.join(f'{k}={_fmt(v)}' for k, v in self.postfix.items()))
        return ', '.join(parts)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n and self.n != self._logged_n:  # not twice the same line
                self.logger.info(self.line())


def _fmt(v: Any) -> str:
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class _Silent(LogProgress):
    """Progress that says nothing (``enabled=False``)."""

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self._closed = True


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = '', unit: str = 'it',
             enabled: bool = True, leave: bool = False, log_interval: float = DEFAULT_LOG_INTERVAL) -> Any:
    """A tqdm bar on a terminal; :class:`LogProgress` lines when stderr is a file or pipe; nothing when
    ``enabled`` is False."""
    if not enabled:
        return _Silent(iterable, total=total, desc=desc, unit=unit)
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, log_interval=log_interval)
