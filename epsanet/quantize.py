"""Int8 ONNX models for onnxruntime (``epsanet quantize``): a deployment path of its own.

Static post-training quantization with onnxruntime's own tools (``onnxruntime.quantization``:
``quant_pre_process``, then ``quantize_static`` in QDQ format):

1. the model is exported as ``epsanet export`` writes it: float32, PSA branch convs in the forms onnxruntime
   runs fastest on this CPU, checked against PyTorch;
2. activation ranges are calibrated on images of a data set (``split``, a seeded random sample of
   ``calibration_images``) through the model's eval transform;
3. weights become int8 per output channel, activations uint8.

The float32 model, its export and its speed targets do not change; this file is an option for deployment.
Quantization changes the numbers, so the result says by how much: with an evaluation split
(``eval_split``) the top-1 of the float32 and the int8 files on the same images and how often their top-1
agrees; always the speed of both files in onnxruntime on this CPU (interleaved, median of ``speed_reps``).

onnxruntime runs int8 convs at full speed on CPUs with VNNI (AVX512-VNNI, AVX-VNNI). On AVX2 CPUs without it,
its uint8 x int8 products can saturate; ``reduce_range=True`` (7-bit weights) avoids that at some cost in
accuracy (onnxruntime's quantization documentation). Measure on the CPU you deploy to.
"""
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np
import torch

from .app.data import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP, dataset_from_config, eval_loader
from .app.errors import ConfigError
from .app.flags import arg
from .app.model import InferenceModelOptions, check_classes, load_for_inference
from .app.outputs import check_output_file, config_inputs, overwrite_option
from .files import atomic_write

__all__ = ['QuantizeConfig', 'quantize', 'quantize_onnx_file', 'CALIBRATION_METHODS']

_logger = logging.getLogger(__name__)

Q = 'quantization'
CALIBRATION_METHODS = ('minmax', 'entropy', 'percentile')


@dataclasses.dataclass
class QuantizeConfig(InferenceModelOptions):
    """Options of :func:`quantize` (model and weights as in ``epsanet validate``)."""
    data_dir: str = arg('', 'ImageFolder root holding <split>/<class>/<image> (or a .tar, or the root of --dataset)', Q)
    split: str = arg('train', 'split whose images calibrate the activation ranges', Q)
    eval_split: str = arg('val', 'split on which the float32 and int8 files are compared ("" to skip)', Q)
    dataset: str = arg('', DATASET_HELP, Q)
    class_map: str = arg('', CLASS_MAP_HELP, Q)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, Q)
    output: str = arg('', 'int8 ONNX file to write (default: MODEL-int8.onnx)', Q, aliases=('-o',))
    calibration_images: int = arg(256, 'images used to calibrate (a seeded random sample of --split)', Q)
    calibrate_method: str = arg('minmax', 'how activation ranges are chosen from the calibration images', Q,
                                choices=CALIBRATION_METHODS)
    per_channel: bool = arg(True, 'one weight scale per output channel (else one per tensor)', Q)
    reduce_range: bool = arg(False, '7-bit weights: avoids uint8 x int8 saturation on CPUs without VNNI', Q)
    onnx_forms: str = arg('auto', 'PSA branch conv forms: auto (fastest in onnxruntime, as epsanet export) or plain', Q,
                          choices=('auto', 'plain'))
    batch_size: int = arg(32, 'batch size for calibration and evaluation', Q, aliases=('-b',))
    speed_batch_size: int = arg(8, 'batch size of the speed comparison', Q)
    speed_reps: int = arg(5, 'timed runs per file in the speed comparison (0 skips it)', Q)
    workers: int = arg(2, 'data loading worker processes', Q, aliases=('-j',))
    seed: int = arg(0, 'seed of the calibration sample', Q)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping them', Q)
    results_file: str = arg('', 'write the results as JSON to this file', Q)
    overwrite: bool = overwrite_option(Q)
    progress: bool = arg(True, 'show a progress bar', Q)


def _import_quantization():
    try:
        import onnxruntime as ort
        from onnxruntime import quantization
    except ImportError as e:
        raise ConfigError('epsanet quantize needs onnxruntime and onnx: pip install "epsanet[export]" '
                          f'(or onnxruntime onnx); {e}') from e
    return ort, quantization


def _check(cfg: QuantizeConfig) -> None:
    if not cfg.data_dir and not cfg.dataset.lower().startswith('hfds/'):
        raise ConfigError('--data-dir is required: calibration needs images of the kind the model will see '
                          '(an ImageFolder root, a .tar or a --dataset root).')


def _batches(loader, progress: bool, desc: str, limit: Optional[int] = None) -> Iterator[tuple]:
    """``(images, targets)`` of readable images only (an unreadable image carries a negative target), at most
    ``limit`` images in all."""
    from .progress import progress as progress_bar

    seen = 0
    for images, targets in progress_bar(loader, desc=desc, unit='batch', enabled=progress):
        keep = targets >= 0
        images, targets = images[keep], targets[keep]
        if limit is not None:
            images, targets = images[:limit - seen], targets[:limit - seen]
        if len(images):
            seen += len(images)
            yield images, targets
        if limit is not None and seen >= limit:
            return


class _Sample(torch.utils.data.Subset):
    """A subset whose ``transform`` is its data set's (timm's loader sets the transform on what it is given)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` interface over the calibration batches."""

    def __init__(self, batches: Iterator[torch.Tensor], input_name: str):
        self.batches, self.input_name, self.count = batches, input_name, 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        images = next(self.batches, None)
        if images is None:
            return None
        self.count += len(images)
        return {self.input_name: images.numpy()}


def _compare(sessions: Dict[str, Any], batches: Iterator[tuple]) -> Dict[str, Any]:
    """Top-1 of each session and how often their top-1 agrees, on the same images."""
    correct = {name: 0 for name in sessions}
    agree = count = 0
    for images, targets in batches:
        preds = {name: s.run(None, {s.get_inputs()[0].name: images.numpy()})[0].argmax(1)
                 for name, s in sessions.items()}
        t = targets.numpy()
        for name, p in preds.items():
            correct[name] += int((p == t).sum())
        agree += int((preds['float32'] == preds['int8']).sum())
        count += len(t)
    if not count:
        return {}
    return dict(eval_images=count, top1_float32=round(100. * correct['float32'] / count, 2),
                top1_int8=round(100. * correct['int8'] / count, 2), top1_agreement=round(100. * agree / count, 2))


def _speed(sessions: Dict[str, Any], batch_size: int, img_size: int, reps: int) -> Dict[str, Any]:
    """img/s of each session on one random batch, timed as ``epsanet benchmark`` times its candidates
    (interleaved in a rotating order, median of ``reps`` runs)."""
    from .timing import Setting, time_steps

    x = np.random.default_rng(0).standard_normal((batch_size, 3, img_size, img_size), dtype=np.float32)
    steps = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
    speed = {r.candidate: r.img_per_s for r in time_steps(steps, Setting('onnxruntime', batch_size, img_size), reps)}
    return dict(speed_batch_size=batch_size, img_per_s_float32=round(speed['float32'], 2),
                img_per_s_int8=round(speed['int8'], 2), int8_speedup=round(speed['int8'] / speed['float32'], 3))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantization tools log a line per tensor on the root logger (bias copies, and per-channel
    notes on BatchNorm's 1-D weights, which stay per-tensor); keep those out of the user's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx_file(path: str, output: str, calibration: Iterable[torch.Tensor], method: str = 'minmax',
                       per_channel: bool = True, reduce_range: bool = False) -> int:
    """Write ``output``, the int8 QDQ form of the float32 ONNX file ``path``, with activation ranges calibrated on
    the ``calibration`` batches (``[N, C, H, W]`` tensors, already transformed as the model expects); returns the
    number of calibration images. onnxruntime's ``quant_pre_process`` prepares the graph first. Written atomically."""
    _, quantization = _import_quantization()
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f'unknown calibration method {method!r}: choose one of {", ".join(CALIBRATION_METHODS)}.')
    import onnx

    input_name = onnx.load(path, load_external_data=False).graph.input[0].name
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:  # before anything is written: an existing output stays as it was
        raise ConfigError('quantization needs at least one calibration image (none was readable); nothing written.')
    reader = _CalibrationReader(itertools.chain([first], batches), input_name)
    calibrate = {'minmax': quantization.CalibrationMethod.MinMax, 'entropy': quantization.CalibrationMethod.Entropy,
                 'percentile': quantization.CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = os.path.join(tmp, 'prepared.onnx')
        quantization.quant_pre_process(path, prepared, skip_symbolic_shape=True)
        atomic_write(output, lambda out: quantization.quantize_static(
            prepared, out, reader, quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce_range, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, calibrate_method=calibrate))
    return reader.count


def quantize(cfg: QuantizeConfig) -> Dict[str, Any]:
    """Write ``cfg.output``, an int8 ONNX model of the weights, and return what it cost (see the module
    docstring): file sizes, top-1 of float32 and int8 on ``eval_split``, and their speed on this CPU."""
    from .export import export_model, onnxruntime_session, optimize_for_onnxruntime

    _check(cfg)
    check_output_file(cfg.results_file, config_inputs(cfg), cfg.overwrite, '--results-file')
    if cfg.output:
        check_output_file(cfg.output, config_inputs(cfg), cfg.overwrite, '--output')
    _import_quantization()  # a missing onnxruntime is said before any work
    calib_set = dataset_from_config(cfg, cfg.split, labels=False)  # calibration needs images only
    if len(calib_set) == 0:
        raise ConfigError(f'the calibration split {cfg.split!r} of {cfg.data_dir or cfg.dataset} has no images.')
    model, data_config, meta = load_for_inference(cfg)
    name = cfg.model or meta.get('model') or 'epsanet50'
    output = cfg.output or f'{name.replace("/", "_").replace(":", "_")}-int8.onnx'
    if not cfg.output:  # the default name, known now
        check_output_file(output, config_inputs(cfg), cfg.overwrite, '--output')
    input_size = tuple(data_config['input_size'])
    eval_set = None
    if cfg.eval_split:  # checked before any work: scores against other labels would be silently wrong
        eval_set = dataset_from_config(cfg, cfg.eval_split, split_flag='--eval-split')
        check_classes(model, meta, eval_set, cfg.checkpoint)
    if cfg.onnx_forms == 'auto':
        model = optimize_for_onnxruntime(model, input_size=input_size, batch_size=cfg.speed_batch_size)

    generator = torch.Generator().manual_seed(cfg.seed)
    picked = torch.randperm(len(calib_set), generator=generator)[:cfg.calibration_images].tolist()
    calib_loader = eval_loader(_Sample(calib_set, picked), data_config, cfg.batch_size, cfg.workers,
                               torch.device('cpu'))
    results: Dict[str, Any] = dict(model=name, output=str(output), input_size=list(input_size),
                                   calibrate_method=cfg.calibrate_method, per_channel=cfg.per_channel,
                                   reduce_range=cfg.reduce_range, cpu=_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, 'float32.onnx')
        export_model(model, fp32, 'onnx', input_size=input_size, batch_size=cfg.speed_batch_size, check=True)
        batches = _batches(calib_loader, cfg.progress, 'calibrate', cfg.calibration_images)
        calibration = (images for images, _ in batches)
        count = quantize_onnx_file(fp32, output, calibration, cfg.calibrate_method, cfg.per_channel, cfg.reduce_range)
        results.update(calibration_images=count, size_mib_float32=round(os.path.getsize(fp32) / 2 ** 20, 1),
                       size_mib_int8=round(os.path.getsize(output) / 2 ** 20, 1))
        threads = torch.get_num_threads()
        sessions = {'float32': onnxruntime_session(fp32, threads), 'int8': onnxruntime_session(str(output), threads)}
        if eval_set is not None:
            loader = eval_loader(eval_set, data_config, cfg.batch_size, cfg.workers, torch.device('cpu'))
            results.update(eval_split=cfg.eval_split, **_compare(sessions, _batches(loader, cfg.progress, 'compare')))
        if cfg.speed_reps:
            results.update(_speed(sessions, cfg.speed_batch_size, input_size[-1], cfg.speed_reps))
    if cfg.results_file:
        atomic_write(cfg.results_file, lambda path: Path(path).write_text(json.dumps(results, indent=1)))
    return results


def _cpu() -> str:
    from .timing import environment

    env = environment()
    return f'{env["cpu"]} ({torch.backends.cpu.get_cpu_capability()}, {env["threads"]} threads)'
