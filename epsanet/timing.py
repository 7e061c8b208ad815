"""Interleaved step timing, shared by ``epsanet benchmark`` and ``epsanet quantize``.

Each repetition runs every step once, in a rotating order, before the next repetition starts, so
load from other processes hits all of them alike; a row reports the median over the repetitions of
the wall time and of the process CPU time (summed over threads).
"""
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ['REFERENCE', 'Row', 'Setting', 'median', 'time_steps']

REFERENCE = 'reference'  # the candidate that ``vs_reference`` ratios divide by


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""
    mode: str = 'infer'
    batch_size: int = 8
    img_size: int = 224
    memory_format: str = 'nchw'
    dtype: str = 'fp32'

    def label(self) -> str:
        return f'{self.mode} {self.memory_format} {self.dtype} b{self.batch_size} {self.img_size}px'


@dataclass
class Row:
    candidate: str
    setting: Setting
    compiled: bool
    times_ms: List[float]
    median_ms: float
    min_ms: float
    img_per_s: float
    cpu_ms: Optional[float] = None  # median process CPU time per step (all threads)
    vs_reference: Optional[float] = None  # img/s over the reference's img/s in the same setting
    cpu_vs_reference: Optional[float] = None  # the same ratio from CPU times
    max_abs_diff: Optional[float] = None  # max |logits - reference logits| (ours, inference only)
    peak_mem_mib: Optional[float] = None


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def time_steps(steps: Dict[str, Callable[[], Any]], setting: Setting, reps: int, warmup: int = 1,
               compiled: bool = False, tick: Optional[Callable[[], None]] = None) -> List[Row]:
    """Run each step ``warmup`` times, then ``reps`` times interleaved in a rotating order; one row each."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed position
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n]()
            times[n].append((time.perf_counter() - t0) * 1000)
            cpu[n].append((time.process_time() - c0) * 1000)
            if tick is not None:
                tick()
    rows = []
    for n in names:
        med = median(times[n])
        rows.append(Row(n, setting, compiled, times[n], med, min(times[n]), setting.batch_size * 1000. / med,
                        cpu_ms=median(cpu[n])))
    ref = next((r for r in rows if r.candidate == REFERENCE), None)
    if ref is not None:
        for r in rows:
            r.vs_reference = r.img_per_s / ref.img_per_s
            r.cpu_vs_reference = ref.cpu_ms / r.cpu_ms
    return rows


def environment() -> Dict[str, Any]:
    """The versions, threads and CPU a timing ran with, for a report."""
    import timm
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    return dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpu=cpu, cores=os.cpu_count(), isa=cpu_isa())


def cpu_isa() -> str:
    """The ISA PyTorch's CPU kernels use, and the x86 vector extensions the CPU has (from /proc/cpuinfo)."""
    flags: List[str] = []
    try:
        with open('/proc/cpuinfo') as f:
            line = next((ln for ln in f if ln.startswith('flags')), '')
        have = set(line.split(':', 1)[-1].split())
        flags = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile') if f in have]
    except OSError:
        pass
    return f'torch kernels {torch.backends.cpu.get_cpu_capability()}; CPU flags {" ".join(flags) or "unknown"}'
