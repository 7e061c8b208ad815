"""Choose each conv's formulation by timing the candidates on the machine where it runs.

As ``torch.backends.cudnn.benchmark`` does for cuDNN: the first time a conv meets an input of a new
shape, every applicable form (:mod:`epsanet.optimize.conv_forms`) is run on that input and timed, and
the fastest is kept for the rest of the process. The cache key holds the conv's shape, the input's
shape, dtype and memory format, the CPU (model name and the ISA PyTorch's kernels use), the number of
threads and the torch version, so a plan measured on one CPU is never used on another.

Forward and backward are chosen separately: the forward form when the conv first runs (under autograd
or not), the input- and weight-gradient forms when its first backward pass runs. Each candidate is run
once to warm up, then ``repeats`` times; the minimum counts (the least disturbed by other work).

Plans are also kept on disk (``$EPSANET_CACHE_DIR/autotune.json``, by default
``~/.cache/epsanet/autotune.json``; ``EPSANET_CACHE_DIR=none`` turns that off), so that later processes on
the same machine run the same forms without timing them again. That matters beyond the seconds saved:
forms agree only within float rounding, and a training run resumed in a new process must compute
exactly what the interrupted one would have.

``EPSANET_CONV_FORMS=grouped_nchw,nchw,nchw`` (forward, input gradient, weight gradient) skips the
timing and forces one form for every conv: for tests, and to compare forms in a benchmark.
"""
import dataclasses
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..cache import ENV_CACHE, cache_dir
from ..files import atomic_write
from . import conv_forms
from .conv_forms import ConvShape

__all__ = ['plan_forward', 'plan_backward', 'clear_cache', 'cache_info', 'cache_file', 'cpu_signature', 'ENV_FORMS',
           'ENV_CACHE']

_logger = logging.getLogger(__name__)

ENV_FORMS = 'EPSANET_CONV_FORMS'
REPEATS = 3

_forward_cache: Dict[Tuple, str] = {}
_backward_cache: Dict[Tuple, Tuple[str, str]] = {}


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature() -> Tuple[str, str, int, str]:
    """``(cpu model, ISA of PyTorch's CPU kernels, threads, torch version)``: the part of every cache key
    that says where a measurement was made."""
    return _cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), torch.__version__


def _forced() -> Optional[Tuple[str, str, str]]:
    value = os.environ.get(ENV_FORMS)
    if not value:
        return None
    parts = tuple(p.strip() for p in value.split(','))
    if (len(parts) != 3 or parts[0] not in conv_forms.FORWARD_FORMS or parts[1] not in conv_forms.INPUT_GRAD_FORMS
            or parts[2] not in conv_forms.WEIGHT_GRAD_FORMS):
        raise ValueError(
            f'{ENV_FORMS}={value!r} must be "FORWARD,INPUT_GRAD,WEIGHT_GRAD" with FORWARD one of '
            f'{conv_forms.FORWARD_FORMS}, INPUT_GRAD one of {conv_forms.INPUT_GRAD_FORMS} and WEIGHT_GRAD one of '
            f'{conv_forms.WEIGHT_GRAD_FORMS}; unset it to let the autotuner choose.')
    return parts  # type: ignore[return-value]


def cache_file() -> Optional[Path]:
    """Where measured plans are kept between processes (None: not kept)."""
    base = cache_dir()
    return None if base is None else base / 'autotune.json'


def _disk_key(kind: str, key: Tuple) -> str:
    shape, signature = key
    return json.dumps([kind, dataclasses.astuple(shape), list(signature)])


@functools.lru_cache(maxsize=1)
def _disk_plans() -> Dict[str, object]:
    path = cache_file()
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as e:
        _logger.warning(f'Ignoring the autotune cache {path} ({e}); plans will be measured again.')
        return {}


def _remember(kind: str, key: Tuple, value: object) -> None:
    plans = _disk_plans()
    plans[_disk_key(kind, key)] = value
    path = cache_file()
    if path is None:
        return
    try:  # atomic: a concurrent reader sees the old or the new file, never half of one
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plans)))
    except OSError as e:
        _logger.debug(f'Could not write the autotune cache {path}: {e}')


def _recall(kind: str, key: Tuple) -> Optional[object]:
    return _disk_plans().get(_disk_key(kind, key))


def _time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    with torch.no_grad():
        fn()
        best = float('inf')
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _fastest(timings: Dict[str, float]) -> str:
    return min(timings, key=timings.__getitem__)


def _log(kind: str, shape: ConvShape, timings: Dict[str, float], choice: str) -> None:
    if _logger.isEnabledFor(logging.DEBUG):
        times = ', '.join(f'{k} {v * 1e3:.2f} ms' for k, v in timings.items())
        _logger.debug(f'{kind} of {shape}: {choice} ({times})')


def plan_forward(shape: ConvShape, x: torch.Tensor, weight: torch.Tensor) -> str:
    """The fastest forward form for ``shape`` on this machine (timed on ``x`` the first time)."""
    forced = _forced()
    if forced:
        return forced[0] if forced[0] in conv_forms.forward_candidates(shape) else 'grouped_nchw'
    key = (shape, cpu_signature())
    if key not in _forward_cache:
        known = _recall('forward', key)
        if isinstance(known, str) and known in conv_forms.forward_candidates(shape):
            _forward_cache[key] = known
            return known
        args = (shape.stride, shape.padding, shape.dilation, shape.groups)
        timings = {form: _time(lambda form=form: conv_forms.run_forward(form, x, weight, *args))
                   for form in conv_forms.forward_candidates(shape)}
        _forward_cache[key] = _fastest(timings)
        _log('forward', shape, timings, _forward_cache[key])
        _remember('forward', key, _forward_cache[key])
    return _forward_cache[key]


def plan_backward(shape: ConvShape, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> Tuple[str, str]:
    """The fastest ``(input gradient, weight gradient)`` forms for ``shape`` (timed the first time)."""
    forced = _forced()
    if forced:
        return forced[1], forced[2]
    key = (shape, cpu_signature())
    if key not in _backward_cache:
        known = _recall('backward', key)
        if (isinstance(known, list) and len(known) == 2 and known[0] in conv_forms.INPUT_GRAD_FORMS
                and known[1] in conv_forms.WEIGHT_GRAD_FORMS):
            _backward_cache[key] = (known[0], known[1])
            return _backward_cache[key]
        args = (shape.stride, shape.padding, shape.dilation, shape.groups)
        t_input = {form: _time(lambda form=form: conv_forms.input_grad(form, grad, x, weight, *args))
                   for form in conv_forms.INPUT_GRAD_FORMS}
        t_weight = {form: _time(lambda form=form: conv_forms.weight_grad(form, grad, x, weight, *args))
                    for form in conv_forms.WEIGHT_GRAD_FORMS}
        _backward_cache[key] = (_fastest(t_input), _fastest(t_weight))
        _log('input gradient', shape, t_input, _backward_cache[key][0])
        _log('weight gradient', shape, t_weight, _backward_cache[key][1])
        _remember('backward', key, list(_backward_cache[key]))
    return _backward_cache[key]


def clear_cache(disk: bool = False) -> None:
    """Forget the plans measured in this process (and, with ``disk``, the ones kept on disk): the next
    call of each conv times its forms again."""
    _forward_cache.clear()
    _backward_cache.clear()
    _disk_plans.cache_clear()
    path = cache_file()
    if disk and path is not None:
        path.unlink(missing_ok=True)


def cache_info() -> List[Dict[str, object]]:
    """The plans measured so far in this process, one dict per conv shape (for logs and benchmarks)."""
    rows: Dict[ConvShape, Dict[str, object]] = {}
    for (shape, _), form in _forward_cache.items():
        rows.setdefault(shape, {'shape': shape})['forward'] = form
    for (shape, _), (gx, gw) in _backward_cache.items():
        rows.setdefault(shape, {'shape': shape}).update(input_grad=gx, weight_grad=gw)
    return list(rows.values())
