"""``epsanet benchmark --ablate``: what each speed mechanism of :mod:`epsanet.optimize` is worth.

Every mechanism is turned off in turn (``without=`` of the transforms), and each such model ("arm") is
measured against the model with everything on, in the same process, in the end-to-end figure the
mechanism exists for:

* ``infer``: one inference step after :func:`epsanet.optimize_for_inference` (median wall time);
* ``train``: one training step (forward, loss, backward, SGD) after :func:`epsanet.optimize_for_training`;
* ``memory``: the peak training memory of a fresh process (as ``epsanet benchmark`` measures it), at the
  same batch size;
* ``onnxruntime``: one onnxruntime inference of the exported model, with its branch conv forms
  (:func:`epsanet.export.optimize_for_onnxruntime`) and without.

Each of ``repeats`` repetitions times every arm of a figure, interleaved in a rotating order (``steps``
timed steps each, median), and turns each arm's figure into a change against the full model's in the
same repetition: ``+5%`` means the figure is 5% higher (slower, or more memory) without the mechanism,
so the mechanism is worth 5%. The table gives the median change over the repetitions, its spread
(lowest and highest), and for time the same median change of process CPU time, which other work on a
shared machine disturbs less.
"""
import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .benchmark import (
    _make_step,
    build_candidates,
    measure_peak_memory,
    onnxruntime_steps,
    optimized_for,
    save_report,
)
from .timing import Setting, environment, median, time_steps

__all__ = ['FIGURES', 'AblationReport', 'run_ablation']

FIGURES = ('infer', 'train', 'memory', 'onnxruntime')
FULL = 'full'
ONNX_FORMS = 'onnx_forms'
# mechanism -> (what it is, the figures it exists for); only those the transforms still have are measured
WORTH: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    'fast_psa': ('FastPSA (output kept for backward)', ('train', 'memory')),
    'fold_batchnorm': ('BatchNorm folded into the convs', ('infer',)),
    'tuned_convs': ('PSA branch convs in their fastest measured form', ('infer',)),
    'recompute_stem': ('stem recomputed in the backward pass', ('memory', 'train')),
    ONNX_FORMS: ('ONNX export forms of the branch convs', ('onnxruntime',)),
}
FIGURE_NAMES = {'infer': 'inference time', 'train': 'training step time', 'memory': 'peak training memory',
                'onnxruntime': 'onnxruntime inference time'}


@dataclass
class AblationRow:
    mechanism: str
    figure: str
    full: float  # the full model's figure: median ms (time) or MiB (memory) over all repetitions
    without: float  # the same without the mechanism
    changes: List[float]  # per repetition: without / full - 1
    cpu_changes: Optional[List[float]] = None  # the same from process CPU time

    @property
    def worth(self) -> float:
        return median(self.changes)


@dataclass
class AblationReport:
    model: str
    rows: List[AblationRow]
    config: Dict[str, Any]
    environment: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return dict(model=self.model, rows=[dict(asdict(r), worth=r.worth) for r in self.rows], config=self.config,
                    environment=self.environment)

    def to_markdown(self) -> str:
        env, cfg = self.environment, self.config
        lines = [
            f'### {self.model}: what each mechanism is worth (batch {cfg["batch_size"]}, {cfg["img_size"]} px, '
            f'{cfg["repeats"]} interleaved repeats)', '',
            f'torch {env["torch"]}, {env["threads"]} threads, {env["cpu"]} ({env["isa"]})', '',
            '| mechanism | figure | with it | without it | worth (median) | spread | worth (CPU time) |',
            '|---|---|---:|---:|---:|---:|---:|',
        ]
        for r in self.rows:
            unit = 'MiB' if r.figure == 'memory' else 'ms'
            cpu = '-' if not r.cpu_changes else f'{100 * median(r.cpu_changes):+.1f}%'
            lines.append(
                f'| {WORTH[r.mechanism][0]} | {FIGURE_NAMES[r.figure]} | {r.full:.0f} {unit} | {r.without:.0f} {unit} '
                f'| {100 * r.worth:+.1f}% | {100 * min(r.changes):+.1f}% .. {100 * max(r.changes):+.1f}% | {cpu} |')
        lines += ['', '- worth: how much higher the figure is without the mechanism, median over the repeats '
                  '(spread: lowest .. highest).']
        return '\n'.join(lines) + '\n'

    def save(self, json_path: Optional[str] = None, markdown_path: Optional[str] = None) -> None:
        """Write the JSON and/or markdown report atomically."""
        save_report(self.to_dict(), self.to_markdown(), json_path, markdown_path)


def _arms(figure: str) -> List[str]:
    from .optimize.transforms import MECHANISMS

    return [FULL] + [m for m, (_, figures) in WORTH.items() if figure in figures and m in (*MECHANISMS, ONNX_FORMS)]


def _rotated(names: List[str], rep: int) -> List[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


def _time_figure(steps: Dict[str, Callable[[], Any]], setting: Setting, repeats: int, n_steps: int,
                 tick: Callable[[], None]) -> Dict[str, List[Tuple[float, float]]]:
    """``{arm: [(median wall ms, median CPU ms) per repetition]}``."""
    out: Dict[str, List[Tuple[float, float]]] = {n: [] for n in steps}
    for rep in range(repeats):
        order = {n: steps[n] for n in _rotated(list(steps), rep)}
        for row in time_steps(order, setting, n_steps, warmup=0 if rep else 1):
            out[row.candidate].append((row.median_ms, row.cpu_ms))
        tick()
    return out


def _memory_figure(model_name: str, setting: Setting, repeats: int, tick: Callable[[], None]) -> Dict[str, List]:
    out: Dict[str, List[Tuple[float, None]]] = {n: [] for n in _arms('memory')}
    for rep in range(repeats):
        for arm in _rotated(list(out), rep):
            without = () if arm == FULL else (arm,)
            out[arm].append((measure_peak_memory(model_name, model_name, setting, optimize=True, without=without),
                             None))
        tick()
    return out


def _rows(figure: str, measured: Dict[str, List[Tuple[float, Optional[float]]]]) -> List[AblationRow]:
    full = measured[FULL]
    rows = []
    for arm, values in measured.items():
        if arm == FULL:
            continue
        changes = [w / f - 1 for (w, _), (f, _) in zip(values, full)]
        cpu = None if figure == 'memory' else [w / f - 1 for (_, w), (_, f) in zip(values, full)]
        rows.append(AblationRow(arm, figure, median([f for f, _ in full]), median([w for w, _ in values]), changes,
                                cpu))
    return rows


def run_ablation(model_name: str = 'epsanet50', batch_size: int = 8, img_size: int = 224, repeats: int = 3,
                 figures: Sequence[str] = FIGURES, infer_steps: int = 3, train_steps: int = 1,
                 progress: bool = True) -> AblationReport:
    """Measure what each mechanism is worth; see the module docstring. ``infer_steps`` and ``train_steps`` are the
    timed steps per arm in each repetition (onnxruntime uses ``infer_steps``); memory is one fresh process per arm
    and repetition at ``batch_size``."""
    from .progress import progress as bar_for

    bad = [f for f in figures if f not in FIGURES]
    if bad or not figures:
        raise ValueError(f'Unknown or missing figure {bad}: choose from {", ".join(FIGURES)}.')
    if min(batch_size, repeats, infer_steps, train_steps) < 1 or img_size < 32:
        raise ValueError('Batch size, repeats and steps must be >= 1 and the image size at least 32 px.')
    plain = build_candidates(model_name, (), seed=0)[model_name]
    rows: List[AblationRow] = []
    with bar_for(total=repeats * len(figures), desc=f'ablation {model_name}', enabled=progress, unit='repeat') as bar:
        for figure in figures:
            bar.set_description(f'ablation {model_name}: {FIGURE_NAMES[figure]}')
            if figure == 'memory':
                measured = _memory_figure(model_name, Setting('train', batch_size, img_size), repeats, bar.update)
            elif figure == 'onnxruntime':
                from .export import optimize_for_onnxruntime

                models = {FULL: optimize_for_onnxruntime(plain, (3, img_size, img_size), batch_size), ONNX_FORMS: plain}
                setting = Setting('onnxruntime', batch_size, img_size)
                steps = onnxruntime_steps(models, setting, torch.get_num_threads())
                measured = _time_figure(steps, setting, repeats, infer_steps, bar.update)
            else:
                setting = Setting(figure, batch_size, img_size)
                steps = {arm: _make_step(optimized_for(copy.deepcopy(plain), figure, () if arm == FULL else (arm,)),
                                         setting, False, 0)[0] for arm in _arms(figure)}
                n = infer_steps if figure == 'infer' else train_steps
                measured = _time_figure(steps, setting, repeats, n, bar.update)
            rows += _rows(figure, measured)
    config = dict(model=model_name, batch_size=batch_size, img_size=img_size, repeats=repeats, figures=list(figures),
                  infer_steps=infer_steps, train_steps=train_steps)
    return AblationReport(model_name, rows, config, environment())
