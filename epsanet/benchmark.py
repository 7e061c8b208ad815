"""Benchmark EPSANet against the authors' reference network and timm's ResNets.

Every candidate runs in the same process, interleaved: each repetition times every candidate
once (in a rotating order) before the next repetition starts, so load from other processes
hits all of them alike; the reported time is the median over the repetitions.

Candidates:

* ``<model>``: ours, as ``timm.create_model(<model>)`` gives it; ``optimize=True`` adds the
  documented one-line CPU setting (:func:`optimized_for`): :func:`epsanet.optimize_for_inference`
  for inference, :func:`epsanet.optimize_for_training` for training;
* ``reference``: :func:`epsanet.reference.create_reference`, the literal authors'-style network,
  holding the *same weights* (ours loads the reference's authors'-layout checkpoint through
  :func:`epsanet.models.epsanet.checkpoint_filter_fn`); for every inference setting the logits
  of ours and the reference on the same input are compared (``max_abs_diff``);
* baselines: any timm model name, by default ``resnet50`` and ``seresnet50``.

A setting's memory format is the format of the *input*. In an NCHW setting every model is
used as created (plus ours' one-line setting with ``optimize``), so the reference and the
baselines run NCHW; in a channels_last setting every model is converted with
``model.to(memory_format=torch.channels_last)``.

Measurements:

* inference: one ``model(x)`` under ``torch.inference_mode``, model in eval mode;
* train: forward, cross-entropy loss, backward, SGD step (momentum 0.9) and
  ``zero_grad(set_to_none=True)``, model in train mode, on a copy of the model;
* img/s = batch size / median step time; latency = median step time (wall clock);
* CPU ms = median process CPU time per step, summed over threads. On a machine shared with other
  work it is far steadier than wall time (waiting for a core is not counted); run with
  ``OMP_WAIT_POLICY=PASSIVE`` so that idle OpenMP threads sleep instead of spinning, else the
  spinning is counted too. "vs reference (CPU time)" is the reference's CPU time over ours;
* peak memory (``measure_memory``): the growth of the resident set size of a *fresh* process
  (``python -m epsanet.benchmark --probe``) over two steps: peak RSS minus the RSS just before
  the first step. One forward and backward pass runs before that (its gradients dropped), so that
  one-time set-up (lazy allocations, oneDNN primitive creation) is not counted.
  The peak is ``ru_maxrss`` when the steps raised it, else the largest RSS a
  thread sampling ``/proc/self/statm`` every 0.5 ms saw (Linux only). glibc is told to serve
  every allocation over 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors
  leave the RSS at once and the number tracks live tensor memory. It covers activations,
  gradients, optimizer state and allocator overhead, not the weights and libraries loaded
  before the step.
  For training it is also measured for ours after timm's ``model.set_grad_checkpointing()``
  (each stage's blocks recompute their forward in the backward pass: far less memory, slower
  steps; reported in its own row, not used for the targets).
"""
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_write
from .timing import REFERENCE, Row, Setting, environment, time_steps

__all__ = ['BenchmarkReport', 'build_candidates', 'load_thresholds', 'optimized_for', 'run_benchmark']

MEMORY_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}
DTYPES = ('fp32', 'bf16')
MODES = ('infer', 'train')
CHECKPOINTED = '{} + set_grad_checkpointing()'  # memory row of ours with timm's gradient checkpointing


# (description, mode, compared with, kind). Ours: its NCHW row (NCHW input, with its one-line setting under
# --optimize); the other model: its best memory format (the faster row); memory: NCHW rows. Thresholds are not
# part of the package: ``thresholds`` (e.g. ``--targets scripts/benchmark_targets.json``) maps descriptions to them.
RATIOS = (
    ('inference, ours vs reference (best format)', 'infer', REFERENCE, 'speed'),
    ('inference, ours vs resnet50 (best format)', 'infer', 'resnet50', 'speed'),
    ('training step, ours vs reference (best format)', 'train', REFERENCE, 'speed'),
    ('training step, ours vs resnet50 (best format)', 'train', 'resnet50', 'speed'),
    ('onnxruntime inference, ours vs resnet50', 'onnxruntime', 'resnet50', 'speed'),
    ('peak training memory, ours / reference', 'train', REFERENCE, 'memory'),
)
ONNXRUNTIME = 'onnxruntime'
ONNXRUNTIME_INT8 = 'onnxruntime-int8'
RUNTIMES = ('torch', ONNXRUNTIME, ONNXRUNTIME_INT8)
INT8_CALIBRATION_BATCHES = 2  # random batches: enough to time the int8 graph; not for accuracy


@dataclass
class BenchmarkReport:
    model: str
    rows: List[Row]
    memory_rows: List[Row]
    targets: List[Dict[str, Any]]
    config: Dict[str, Any]
    environment: Dict[str, Any]
    logits_ok: Optional[bool] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        env = self.environment
        lines = [
            f'### {self.model}: throughput (median of {self.config["reps"]} interleaved runs, '
            f'train: {self.config["train_reps"]})',
            '',
            f'torch {env["torch"]}, timm {env["timm"]}, {env["threads"]} threads, {env["cpu"]} ({env.get("isa", "")})',
            '',
            '| candidate | mode | format | dtype | batch | img | img/s | latency ms | vs reference '
            '| CPU ms | vs reference (CPU time) | max abs diff logits |',
            '|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|',
        ]
        for r in self.rows:
            s = r.setting
            name = r.candidate + (' (compiled)' if r.compiled else '')
            lines.append(
                f'| {name} | {s.mode} | {s.memory_format} | {s.dtype} | {s.batch_size} | {s.img_size} '
                f'| {r.img_per_s:.1f} | {r.median_ms:.1f} | {_fmt(r.vs_reference, "{:.2f}x")} '
                f'| {_fmt(r.cpu_ms, "{:.0f}")} | {_fmt(r.cpu_vs_reference, "{:.2f}x")} '
                f'| {_fmt(r.max_abs_diff, "{:.1e}")} |')
        if self.memory_rows:
            lines += [
                '', '### Peak memory (RSS growth of a fresh process over two steps)', '',
                '| candidate | mode | format | dtype | batch | img | peak MiB | vs reference |',
                '|---|---|---|---|---|---|---:|---:|',
            ]
            for r in self.memory_rows:
                s = r.setting
                lines.append(
                    f'| {r.candidate} | {s.mode} | {s.memory_format} | {s.dtype} | {s.batch_size} '
                    f'| {s.img_size} | {r.peak_mem_mib:.0f} | {_fmt(r.vs_reference, "{:.2f}x")} |')
        if self.targets:
            lines += ['', '### Ratios', '', '| ratio | measured | needed | met | measured (CPU time) |',
                      '|---|---:|---:|---|---:|']
            for t in self.targets:
                op = '<=' if t['kind'] == 'memory' else '>='
                needed = '-' if t['threshold'] is None else f'{op} {t["threshold"]:.2f}x'
                lines.append(
                    f'| {t["description"]} ({t["setting"]}) | {_fmt(t["measured"], "{:.2f}x")} '
                    f'| {needed} | {_fmt(t["met"], "{}")} | {_fmt(t["cpu_measured"], "{:.2f}x")} |')
        lines += ['', f'logits within {self.config["tol"]:g} of the reference (fp32): {_fmt(self.logits_ok, "{}")}']
        lines += [f'- {n}' for n in self.notes]
        return '\n'.join(lines) + '\n'

    def save(self, json_path: Optional[str] = None, markdown_path: Optional[str] = None) -> None:
        """Write the JSON and/or markdown report atomically."""
        save_report(self.to_dict(), self.to_markdown(), json_path, markdown_path)


def save_report(data: Dict[str, Any], markdown: str, json_path: Optional[str], markdown_path: Optional[str]) -> None:
    """Write a report's JSON and/or markdown atomically."""
    if json_path:
        _atomic_write(json_path, json.dumps(data, indent=2) + '\n')
    if markdown_path:
        _atomic_write(markdown_path, markdown)


def _fmt(value, pattern: str) -> str:
    return '-' if value is None else pattern.format(value)


def _atomic_write(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _check_names(model_name: str, baselines: Sequence[str]) -> None:
    import timm

    import epsanet

    if model_name not in epsanet.MODEL_NAMES:
        raise ValueError(f'Unknown EPSANet model {model_name!r}: choose one of {", ".join(epsanet.MODEL_NAMES)}.')
    for name in baselines:
        if name in (REFERENCE, model_name):
            raise ValueError(f'Baseline {name!r} is always measured; list other timm models as baselines.')
        if not timm.is_model(name):
            raise ValueError(f'Unknown baseline {name!r}: it is not a timm model name (see timm.list_models()).')


def build_candidates(
        model_name: str = 'epsanet50',
        baselines: Sequence[str] = ('resnet50', 'seresnet50'),
        seed: int = 0,
) -> Dict[str, nn.Module]:
    """Ours, the reference holding the same weights, and the baselines, all on CPU in eval mode."""
    import timm

    from .models.epsanet import checkpoint_filter_fn
    from .reference import authors_checkpoint, create_reference

    _check_names(model_name, baselines)
    torch.manual_seed(seed)
    reference = create_reference(model_name)
    ours = timm.create_model(model_name)
    state = checkpoint_filter_fn(authors_checkpoint(reference, arch=model_name), ours)
    ours.load_state_dict(state)
    candidates = {model_name: ours, REFERENCE: reference}
    for name in baselines:
        candidates[name] = timm.create_model(name)
    return {k: m.eval() for k, m in candidates.items()}


def optimized_for(model: nn.Module, mode: str, without: Sequence[str] = ()) -> nn.Module:
    """Ours with the documented one-line CPU setting of ``mode`` (the input may stay NCHW):
    ``epsanet.optimize_for_inference(model)`` for ``'infer'``, ``epsanet.optimize_for_training(model)``
    for ``'train'`` (both store the weights channels_last); ``without``
    leaves mechanisms off (:data:`epsanet.optimize.transforms.MECHANISMS`)."""
    from .optimize import optimize_for_inference, optimize_for_training

    if mode == 'infer':
        return optimize_for_inference(model.eval(), without=without)
    return optimize_for_training(model, without=without)


def _in_setting_format(model: nn.Module, setting: Setting) -> nn.Module:
    """``model`` itself (NCHW input: used as created) or a channels_last copy."""
    if setting.memory_format == 'channels_last':
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    return model


def _autocast(dtype: str):
    return torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16')


def _make_step(model: nn.Module, setting: Setting, compiled: bool, seed: int) -> Tuple[Callable[[], Any], nn.Module]:
    """A closure running one inference or training step of ``model`` in ``setting``."""
    fmt = MEMORY_FORMATS[setting.memory_format]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size, generator=gen)
    x = x.contiguous(memory_format=fmt)
    if setting.mode == 'infer':
        model = _in_setting_format(model, setting).eval()
        run = torch.compile(model) if compiled else model

        def infer():
            with torch.inference_mode(), _autocast(setting.dtype):
                return run(x)
        return infer, model

    model = copy.deepcopy(_in_setting_format(model, setting)).train()  # keeps the shared weights unchanged
    run = torch.compile(model) if compiled else model
    target = torch.randint(0, 1000, (setting.batch_size,), generator=gen) % _num_classes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        with _autocast(setting.dtype):
            loss = F.cross_entropy(run(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step, model


def _num_classes(model: nn.Module) -> int:
    fc = getattr(model, 'fc', None)
    return getattr(fc, 'out_features', 1000)


def _max_abs_diff(ours: nn.Module, reference: nn.Module, setting: Setting, seed: int) -> float:
    fmt = MEMORY_FORMATS[setting.memory_format]
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size, generator=gen)
    x = x.contiguous(memory_format=fmt)
    with torch.inference_mode(), _autocast(setting.dtype):
        a = _in_setting_format(ours, setting).eval()(x).float()
        b = _in_setting_format(reference, setting).eval()(x).float()
    return (a - b).abs().max().item()


def time_setting(
        candidates: Dict[str, nn.Module],
        setting: Setting,
        reps: int,
        warmup: int = 1,
        compiled: bool = False,
        seed: int = 0,
        tick: Optional[Callable[[], None]] = None,
) -> List[Row]:
    """Time every candidate in ``setting``, interleaved, and return one row per candidate."""
    steps = {n: _make_step(m, setting, compiled, seed)[0] for n, m in candidates.items()}
    return time_steps(steps, setting, reps, warmup + (1 if compiled else 0), compiled, tick)


def measure_peak_memory(
        candidate: str,
        model_name: str,
        setting: Setting,
        optimize: bool = False,
        steps: int = 2,
        timeout: float = 900.,
        grad_checkpointing: bool = False,
        without: Sequence[str] = (),
) -> float:
    """Peak RSS growth (MiB) of a fresh process running ``steps`` steps of one candidate
    (``grad_checkpointing``: after timm's ``model.set_grad_checkpointing()``; ``without``: see
    :func:`optimized_for`)."""
    spec = dict(candidate=candidate, model=model_name, setting=asdict(setting), optimize=optimize, steps=steps,
                threads=torch.get_num_threads(), grad_checkpointing=grad_checkpointing, without=list(without))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    proc = subprocess.run(
        [sys.executable, '-m', 'epsanet.benchmark', '--probe', json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'memory probe for {candidate} failed:\n{proc.stderr[-2000:]}')
    return float(json.loads(proc.stdout.strip().splitlines()[-1])['peak_mib'])


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _one_time_setup(model: nn.Module, setting: Setting) -> None:
    """One forward (and backward) pass before the measured steps, its gradients dropped: set-up done once
    per process (lazy allocations, oneDNN primitive creation) is not counted."""
    x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size)
    x = x.contiguous(memory_format=MEMORY_FORMATS[setting.memory_format])
    with _autocast(setting.dtype):
        if setting.mode == 'infer':
            with torch.inference_mode():
                model(x)
            return
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)


def _probe(spec: Dict[str, Any]) -> Dict[str, float]:
    """Body of the ``--probe`` subprocess: build one candidate, run steps, report the RSS peak."""
    import timm

    import epsanet  # noqa: F401  (registers the models)

    from .reference import create_reference

    torch.set_num_threads(spec['threads'])
    name = spec['candidate']
    if name == REFERENCE:
        model = create_reference(spec['model'])
    else:
        model = timm.create_model(name)
        if spec['optimize'] and name == spec['model']:
            model = optimized_for(model, spec['setting']['mode'], spec.get('without', ()))
    if spec.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    setting = Setting(**spec['setting'])
    step, model = _make_step(model, setting, False, seed=0)
    _one_time_setup(model, setting)
    before = _rss_bytes()
    max_before = _max_rss_bytes()
    sampled = [before]
    done = threading.Event()

    def sample():  # torch ops release the GIL, so this sees the RSS while they run
        while not done.is_set():
            sampled[0] = max(sampled[0], _rss_bytes())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(spec['steps']):
            step()
    finally:
        done.set()
        sampler.join()
    max_after = _max_rss_bytes()
    # exact when the steps raised the process' all-time peak, else the sampled peak
    peak = max_after if max_after > max_before else sampled[0]
    return {'peak_mib': (max(peak, sampled[0]) - before) / 2 ** 20}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _pick(pool: List[Row], name: str, mode: str, fmt: str, main: Optional[Setting]) -> Optional[Row]:
    """The uncompiled fp32 row of ``name`` in ``mode``/``fmt`` (at ``main``'s batch and size if given)."""
    for r in pool:
        s = r.setting
        if (r.candidate == name and not r.compiled and s.mode == mode and s.memory_format == fmt
                and s.dtype == 'fp32' and (main is None or (s.batch_size, s.img_size) == (main.batch_size,
                                                                                         main.img_size))):
            return r
    return None


def _best(pool: List[Row], name: str, mode: str, main: Setting) -> Optional[Row]:
    """``name``'s fastest fp32 row in ``mode`` at ``main``'s batch and size, over memory formats."""
    rows = [r for r in pool if r.candidate == name and not r.compiled and r.setting.mode == mode
            and r.setting.dtype == 'fp32' and (r.setting.batch_size, r.setting.img_size) == (main.batch_size,
                                                                                            main.img_size)]
    return max(rows, key=lambda r: r.img_per_s, default=None)


def load_thresholds(path: str) -> Dict[str, float]:
    """``{ratio description: threshold}`` from a JSON file (see ``scripts/benchmark_targets.json``); a speed ratio
    meets its threshold at or above it, a memory ratio at or below it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'Cannot read the thresholds file {path}: {e}') from e
    known = {r[0] for r in RATIOS}
    if not isinstance(data, dict) or not all(k in known and isinstance(v, (int, float)) for k, v in data.items()):
        raise ValueError(f'{path} must map ratio descriptions to numbers; the descriptions are: {", ".join(known)}.')
    return {k: float(v) for k, v in data.items()}


def _evaluate_targets(model_name: str, rows: List[Row], memory_rows: List[Row], main: Setting,
                      thresholds: Dict[str, float]) -> List[Dict]:
    out = []
    for desc, mode, other, kind in RATIOS:
        cpu_measured = None
        threshold = thresholds.get(desc)
        if kind == 'memory':
            a, b = _pick(memory_rows, model_name, mode, 'nchw', None), _pick(memory_rows, other, mode, 'nchw', None)
            if a is None or b is None:
                continue
            measured = a.peak_mem_mib / b.peak_mem_mib if b.peak_mem_mib else None
            met = None if measured is None or threshold is None else measured <= threshold
        else:
            a, b = _pick(rows, model_name, mode, 'nchw', main), _best(rows, other, mode, main)
            if a is None or b is None:
                continue
            measured = a.img_per_s / b.img_per_s
            met = None if threshold is None else measured >= threshold
            cpu_measured = b.cpu_ms / a.cpu_ms if a.cpu_ms and b.cpu_ms else None
        out.append(dict(description=desc, setting=f'{a.setting.label()} vs {b.candidate} {b.setting.memory_format}',
                        kind=kind, threshold=threshold, measured=measured, met=met, cpu_measured=cpu_measured))
    return out


def onnxruntime_steps(candidates: Dict[str, nn.Module], setting: Setting, threads: int,
                      int8: bool = False) -> Dict[str, Callable[[], Any]]:
    """One onnxruntime CPU inference step per candidate, exported with ``epsanet export``'s ONNX writer (checked
    against PyTorch); with ``int8`` each file is first quantized as ``epsanet quantize`` does
    (:func:`epsanet.quantize.quantize_onnx_file`), calibrated on random batches, which times the int8 graph but
    says nothing of its accuracy."""
    from .export import export_model, onnxruntime_session
    from .quantize import quantize_onnx_file

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in candidates.items():
            path = os.path.join(tmp, f'{name}.onnx')
            export_model(model.eval(), path, format='onnx', batch_size=setting.batch_size,
                         input_size=(3, setting.img_size, setting.img_size), check=True)
            if int8:
                generator = torch.Generator().manual_seed(0)
                batches = [torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size, generator=generator)
                           for _ in range(INT8_CALIBRATION_BATCHES)]
                path, fp32 = os.path.join(tmp, f'{name}-int8.onnx'), path
                quantize_onnx_file(fp32, path, batches)
            sessions[name] = onnxruntime_session(path, threads)
    x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size,
                    generator=torch.Generator().manual_seed(0)).numpy()
    return {n: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for n, s in sessions.items()}


def time_onnxruntime(candidates: Dict[str, nn.Module], setting: Setting, reps: int, threads: int,
                     tick: Optional[Callable[[], None]] = None, int8: bool = False) -> List[Row]:
    """Time :func:`onnxruntime_steps` of every candidate, interleaved; rows have mode ``onnxruntime`` (or
    ``onnxruntime-int8`` with ``int8``)."""
    steps = onnxruntime_steps(candidates, setting, threads, int8)
    ort_setting = Setting(ONNXRUNTIME_INT8 if int8 else ONNXRUNTIME, setting.batch_size, setting.img_size, 'nchw',
                          'int8' if int8 else 'fp32')
    return time_steps(steps, ort_setting, reps, warmup=1, tick=tick)


def run_benchmark(
        model_name: str = 'epsanet50',
        batch_size: int = 8,
        img_size: int = 224,
        modes: Sequence[str] = MODES,
        memory_formats: Sequence[str] = ('nchw', 'channels_last'),
        dtypes: Sequence[str] = ('fp32',),
        baselines: Sequence[str] = ('resnet50', 'seresnet50'),
        batch_sweep: Sequence[int] = (1, 16),
        img_sweep: Sequence[int] = (160, 288),
        compile: bool = False,
        reps: int = 9,
        train_reps: int = 9,
        measure_memory: bool = True,
        memory_batch_size: int = 16,
        memory_modes: Sequence[str] = ('train',),
        optimize: bool = False,
        runtimes: Sequence[str] = ('torch', ONNXRUNTIME),
        tol: float = 1e-4,
        seed: int = 0,
        progress: bool = True,
        thresholds: Optional[Dict[str, float]] = None,
) -> BenchmarkReport:
    """Measure ``model_name`` against the reference and ``baselines``; see the module docstring.

    The main settings are every combination of ``modes`` x ``memory_formats`` x ``dtypes`` at
    ``batch_size`` and ``img_size``. The sweeps add inference runs (first memory format,
    fp32) of ours and the reference at the other batch sizes in ``batch_sweep`` and image sizes
    in ``img_sweep``. ``compile=True`` measures the ``torch.compile``'d candidates as well (slow
    to warm up). Peak memory is measured for every candidate in ``memory_modes``, training at
    ``memory_batch_size`` and inference at ``batch_size``, first memory format, fp32; each
    measurement starts a fresh process (a few seconds each). ``runtimes`` with ``'onnxruntime'`` adds
    inference rows (mode ``onnxruntime``) of every candidate exported to ONNX and run by onnxruntime's
    CPU session at ``batch_size`` and ``img_size``; ``'onnxruntime-int8'`` the same for the int8 files
    (speed only; no ratio uses them). ``thresholds`` (:func:`load_thresholds`) marks each ratio met or not.
    """
    from .progress import progress as bar_for

    _check_names(model_name, baselines)
    for values, allowed, what in ((modes, MODES, 'mode'), (memory_formats, tuple(MEMORY_FORMATS), 'memory format'),
                                  (dtypes, DTYPES, 'dtype'), (memory_modes, MODES, 'memory mode')):
        bad = [v for v in values if v not in allowed]
        if bad or (not values and what != 'memory mode'):
            raise ValueError(f'Unknown or missing {what} {bad}: choose from {", ".join(allowed)}.')
    bad_runtimes = [r for r in runtimes if r not in RUNTIMES]
    if bad_runtimes:
        raise ValueError(f'Unknown runtime {bad_runtimes}: choose from {", ".join(RUNTIMES)}.')
    for n in (batch_size, img_size, reps, train_reps, memory_batch_size, *batch_sweep, *img_sweep):
        if int(n) < 1:
            raise ValueError(f'Batch sizes, image sizes and repetition counts must be >= 1, got {n}.')
    if img_size < 32 or any(s < 32 for s in img_sweep):
        raise ValueError('Image sizes must be at least 32 px (the network downsamples by 32).')

    candidates = build_candidates(model_name, baselines, seed=seed)
    infer_candidates = dict(candidates)
    if optimize:
        infer_candidates[model_name] = optimized_for(copy.deepcopy(candidates[model_name]), 'infer')
        candidates[model_name] = optimized_for(copy.deepcopy(candidates[model_name]), 'train')
    main = [Setting(m, batch_size, img_size, f, d) for m in modes for f in memory_formats for d in dtypes]
    sweep = [Setting('infer', b, img_size, memory_formats[0], 'fp32') for b in batch_sweep if b != batch_size]
    sweep += [Setting('infer', batch_size, s, memory_formats[0], 'fp32') for s in img_sweep if s != img_size]
    sweep_candidates = {k: infer_candidates[k] for k in (model_name, REFERENCE)}
    plan = [(s, infer_candidates if s.mode == 'infer' else candidates) for s in main] if 'torch' in runtimes else []
    plan += [(s, sweep_candidates) for s in sweep] if 'torch' in runtimes else []
    compiled_flags = (False, True) if compile else (False,)
    total = sum(len(c) * (reps if s.mode == 'infer' else train_reps) for s, c in plan) * len(compiled_flags)

    rows: List[Row] = []
    logits_ok: Optional[bool] = None
    with bar_for(total=total, desc=f'benchmark {model_name}', enabled=progress, unit='step') as bar:
        for setting, cands in plan:
            diff = None
            if setting.mode == 'infer':
                diff = _max_abs_diff(cands[model_name], cands[REFERENCE], setting, seed)
                if setting.dtype == 'fp32':
                    logits_ok = (logits_ok is not False) and diff <= tol
            for compiled in compiled_flags:
                bar.set_description(f'benchmark {model_name}: ' + setting.label() + (' compiled' if compiled else ''))
                n_reps = reps if setting.mode == 'infer' else train_reps
                new = time_setting(cands, setting, n_reps, compiled=compiled, seed=seed, tick=bar.update)
                for r in new:
                    if r.candidate == model_name:
                        r.max_abs_diff = diff
                rows += new

    ort_runtimes = [r for r in (ONNXRUNTIME, ONNXRUNTIME_INT8) if r in runtimes]
    if ort_runtimes:
        plain = build_candidates(model_name, baselines, seed=seed)
        if optimize:  # ours as `epsanet export --format onnx` writes it: branch forms timed in onnxruntime
            from .export import optimize_for_onnxruntime
            plain[model_name] = optimize_for_onnxruntime(plain[model_name], (3, img_size, img_size), batch_size)
        for runtime in ort_runtimes:
            with bar_for(total=len(plain) * reps, desc=runtime, enabled=progress, unit='step') as bar:
                rows += time_onnxruntime(plain, Setting('infer', batch_size, img_size), reps, torch.get_num_threads(),
                                         tick=bar.update, int8=runtime == ONNXRUNTIME_INT8)

    memory_rows: List[Row] = []
    if measure_memory:
        mem_settings = [Setting(m, memory_batch_size if m == 'train' else batch_size, img_size,
                                memory_formats[0], 'fp32') for m in memory_modes]
        names = list(candidates)
        for setting in bar_for(mem_settings, desc='peak memory', enabled=progress):
            for name in names:
                peak = measure_peak_memory(name, model_name, setting, optimize=optimize)
                memory_rows.append(Row(name, setting, False, [], 0., 0., 0., peak_mem_mib=peak))
            if setting.mode == 'train':  # the documented memory setting: timm's gradient checkpointing
                peak = measure_peak_memory(model_name, model_name, setting, optimize=optimize, grad_checkpointing=True)
                memory_rows.append(Row(CHECKPOINTED.format(model_name), setting, False, [], 0., 0., 0.,
                                       peak_mem_mib=peak))
            ref = next(r for r in memory_rows if r.candidate == REFERENCE and r.setting == setting)
            for r in memory_rows:
                if r.setting == setting and ref.peak_mem_mib > 0:
                    r.vs_reference = r.peak_mem_mib / ref.peak_mem_mib

    config = dict(model=model_name, batch_size=batch_size, img_size=img_size, modes=list(modes),
                  memory_formats=list(memory_formats), dtypes=list(dtypes), baselines=list(baselines),
                  batch_sweep=list(batch_sweep), img_sweep=list(img_sweep), compile=compile, reps=reps,
                  train_reps=train_reps, measure_memory=measure_memory, memory_batch_size=memory_batch_size,
                  memory_modes=list(memory_modes), runtimes=list(runtimes),
                  optimize=optimize, tol=tol, seed=seed)
    targets = _evaluate_targets(model_name, rows, memory_rows, Setting('infer', batch_size, img_size), thresholds or {})
    notes = []
    if optimize:
        notes.append(f'{model_name} runs with its one-line CPU setting: inference after '
                     '`epsanet.optimize_for_inference(model)`, training after `epsanet.optimize_for_training(model)` '
                     '(both store the weights channels_last). The '
                     'format column is the input\'s; in NCHW rows the other models run as created.')
    return BenchmarkReport(model_name, rows, memory_rows, targets, config, environment(), logits_ok, notes)


def _main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == '--probe':
        print(json.dumps(_probe(json.loads(argv[1]))))
        return 0
    print('usage: epsanet benchmark ...  (this module is the Python API; `--probe` is internal)', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(_main())
