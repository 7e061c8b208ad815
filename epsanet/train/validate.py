"""Validation: top-1, top-5, loss and img/s of a model on an ImageFolder split or any other data source.

:func:`evaluate` runs a model over a loader (also used by training, under DDP too);
:func:`validate` is ``epsanet validate``: build the model from weights, evaluate with the model's
eval transform, optionally per-class accuracy and a confusion matrix, and a JSON results file.
"""
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from timm.data.distributed_sampler import OrderedDistributedSampler

from ..app.data import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP, dataset_from_config, eval_loader, verify_images
from ..app.device import all_reduce_sum, autocast_for
from ..app.errors import ConfigError
from ..app.flags import arg, default_workers
from ..app.model import InferenceModelOptions, check_classes, load_for_inference
from ..app.outputs import check_output_file, config_inputs, overwrite_option
from ..data import DataError, dataset_classes
from ..data.folder import skipped_index
from ..files import atomic_write
from ..optimize import optimize_for_inference
from ..progress import DEFAULT_LOG_INTERVAL
from ..progress import progress as progress_bar

__all__ = ['ValidateConfig', 'evaluate', 'validate']

_logger = logging.getLogger(__name__)


def _valid_count(loader) -> Optional[int]:
    """Samples of this process that are real: timm's ordered sampler pads the last ranks with repeats."""
    sampler = getattr(loader, 'sampler', None)
    if isinstance(sampler, OrderedDistributedSampler):
        n = len(sampler.dataset)
        return max(0, math.ceil((n - sampler.rank) / sampler.num_replicas))
    return None


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        loader,
        device: torch.device,
        num_classes: int,
        autocast: Callable = None,
        channels_last: bool = False,
        confusion: bool = False,
        progress: bool = True,
        desc: str = 'validate',
        log_interval: float = DEFAULT_LOG_INTERVAL,
) -> Dict[str, Any]:
    """Top-1, top-5 (top-k with k = min(5, classes)), mean loss, img/s, sample count over ``loader``.

    Samples with a negative target (an image that could not be read, see
    :func:`~epsanet.data.folder.unreadable_target`) enter no metric: they are counted in ``skipped``
    and their indices listed in ``skipped_indices`` (this process's only). Under DDP the counts are
    summed over processes; the padding of timm's distributed eval sampler is not counted, so the
    numbers are exact. ``confusion`` adds ``confusion``: a
    ``[true, predicted]`` count matrix.
    """
    autocast = autocast or (lambda: torch.autocast(device.type, enabled=False))
    model.eval()
    k = min(5, num_classes)
    valid = _valid_count(loader)
    seen = 0
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, skipped
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
    skipped: List[int] = []
    start = time.perf_counter()
    for images, targets in progress_bar(loader, desc=desc, unit='batch', enabled=progress, log_interval=log_interval):
        images, targets = images.to(device), targets.to(device)
        keep = len(targets) if valid is None else max(0, min(len(targets), valid - seen))
        seen += len(targets)
        if keep == 0:
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits, targets = logits[:keep].float(), targets[:keep]
        readable = targets >= 0  # unreadable images carry a negative target: they enter no metric
        if not bool(readable.all()):
            skipped.extend(skipped_index(t) for t in targets[~readable].tolist())
            logits, targets = logits[readable], targets[readable]
        sums[4] += float(keep - len(targets))
        if len(targets) == 0:
            continue
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums[:4] += torch.stack([
            torch.nn.functional.cross_entropy(logits, targets, reduction='sum').double(),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
            torch.tensor(len(targets), device=device).double()])
        if matrix is not None:
            matrix += torch.bincount(targets * num_classes + top[:, 0], minlength=num_classes * num_classes)
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(sums)
    count = int(sums[3].item())
    if count == 0:
        raise DataError('the validation split produced no readable samples.')
    out = dict(top1=100.0 * sums[1].item() / count, top5=100.0 * sums[2].item() / count,
               loss=sums[0].item() / count, count=count, img_per_sec=count / max(elapsed, 1e-9),
               skipped=int(sums[4].item()), skipped_indices=sorted(skipped))
    if matrix is not None:
        out['confusion'] = all_reduce_sum(matrix).view(num_classes, num_classes).cpu()
    return out


V = 'validation'


@dataclasses.dataclass
class ValidateConfig(InferenceModelOptions):
    """Options of :func:`validate`; flag names follow timm's validate.py."""
    data_dir: str = arg('', 'ImageFolder root holding <split>/<class>/<image> (or a .tar, or the root of --dataset)', V)
    split: str = arg('val', 'split to validate on: a subfolder ("" for --data-dir itself) or the data set\'s split', V)
    dataset: str = arg('', DATASET_HELP, V)
    class_map: str = arg('', CLASS_MAP_HELP, V)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, V)
    batch_size: int = arg(256, 'batch size', V, aliases=('-b',))
    workers: int = arg(default_workers(4), 'data loading worker processes (default: 4, at most the CPUs)',
                       V, aliases=('-j',))
    device: str = arg('', 'device (default: cuda if available, else cpu)', V)
    amp: bool = arg(False, 'mixed precision', V)
    amp_dtype: str = arg('', 'mixed precision dtype', V, choices=('float16', 'bfloat16'))
    channels_last: bool = arg(False, 'channels-last memory layout', V)
    cpu_optimize: bool = arg(True, 'on CPU, run the model after epsanet.optimize_for_inference (BatchNorm folded, PSA '
                                   'convs in the forms measured fastest on this CPU; same outputs)', V)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping and counting them', V)
    results_file: str = arg('', 'write the results as JSON to this file', V)
    overwrite: bool = overwrite_option(V)
    per_class: bool = arg(False, 'add per-class accuracy to the results', V)
    confusion_matrix: bool = arg(False, 'add the confusion matrix ([true][predicted] counts) to the results', V)
    progress: bool = arg(True, 'show a progress bar', V)


def validate(cfg: ValidateConfig) -> Dict[str, Any]:
    """Validate ``cfg.checkpoint`` (or registered weights) on ``cfg.data_dir/cfg.split``; return the results."""
    if not cfg.data_dir and not cfg.dataset.lower().startswith('hfds/'):
        raise ConfigError('--data-dir is required: an ImageFolder root (see --split), a .tar or a --dataset root.')
    check_output_file(cfg.results_file, config_inputs(cfg), cfg.overwrite, '--results-file')
    dataset = dataset_from_config(cfg, cfg.split, batch_size=cfg.batch_size)
    classes = dataset_classes(dataset) or []
    if cfg.strict:
        verify_images(dataset, cfg.progress)
    if not cfg.checkpoint and not cfg.pretrained:
        _logger.warning('no --checkpoint or --pretrained: validating a randomly initialised model.')
    model, data_config, meta = load_for_inference(cfg, **({} if cfg.num_classes or cfg.checkpoint or not classes else
                                                          dict(num_classes=len(classes))))
    num_classes = model.num_classes
    check_classes(model, meta, dataset, cfg.checkpoint)
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.cpu_optimize and device.type == 'cpu':
        optimize_for_inference(model)
    loader = eval_loader(dataset, data_config, cfg.batch_size, cfg.workers, device)
    want_matrix = cfg.per_class or cfg.confusion_matrix
    metrics = evaluate(model, loader, device, num_classes, autocast_for(device, cfg.amp, cfg.amp_dtype),
                       cfg.channels_last, confusion=want_matrix, progress=cfg.progress)
    skipped_files = [dataset.filename(i) for i in metrics['skipped_indices']] if hasattr(dataset, 'filename') else []
    results = dict(
        model=model.pretrained_cfg.get('architecture', cfg.model), checkpoint=cfg.checkpoint or None,
        top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'],
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'], count=metrics['count'],
        correct=round(metrics['top1'] * metrics['count'] / 100),
        img_per_sec=round(metrics['img_per_sec'], 2), skipped_unreadable=metrics['skipped'],
        skipped_files=skipped_files)
    if want_matrix:
        matrix = metrics['confusion']
        names = classes or [str(i) for i in range(num_classes)]
        if cfg.per_class:
            totals = matrix.sum(1).clamp(min=1)
            results['per_class'] = {c: 100.0 * matrix[i, i].item() / totals[i].item() for i, c in enumerate(names)}
        if cfg.confusion_matrix:
            results['classes'] = names
            results['confusion_matrix'] = matrix.tolist()
    if metrics['skipped']:
        _logger.warning('%d unreadable images were skipped and left out of the metrics: %s', metrics['skipped'],
                        ', '.join(skipped_files) or '(paths above)')
    if cfg.results_file:
        text = json.dumps(results, indent=1)
        atomic_write(cfg.results_file, lambda tmp: Path(tmp).write_text(text))
    return results
