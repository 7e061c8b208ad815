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
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from timm.data.distributed_sampler import OrderedDistributedSampler

from ..app.outputs import check_output_file, config_inputs, overwrite_option
from ..data import DataError, create_image_dataset, dataset_classes
from ..data.folder import skipped_index, unreadable_error
from ..files import atomic_write
from ..optimize import optimize_for_inference
from ..progress import DEFAULT_LOG_INTERVAL
from ..progress import progress as progress_bar
from .checkpoint import read_weights_metadata
from .config import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP, InferenceModelOptions
from .errors import CheckpointError, ConfigError
from .factory import build_model
from .flags import arg
from .loaders import autocast_for, data_config_for, eval_loader

__all__ = ['ValidateConfig', 'evaluate', 'validate', 'verify_images']

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
    from .distributed import all_reduce_sum

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


def verify_images(dataset, progress: bool = True) -> None:
    """``--strict``: decode every image first; fail listing those that cannot be read."""
    if not hasattr(dataset, 'verify'):  # streamed shards: an unreadable sample fails when it is reached
        return
    bad = dataset.verify(progress=progress)
    if bad:
        raise unreadable_error(bad, dataset.root)


V = 'validation'


def dataset_from_config(cfg, split: str, is_training: bool = False, mark_unreadable: bool = True, **kwargs: Any):
    """The data set named by a config's ``dataset``/``data_dir``/``class_map``/``dataset_download``/``strict``."""
    return create_image_dataset(
        getattr(cfg, 'dataset', ''), cfg.data_dir, split, class_map=getattr(cfg, 'class_map', '') or None,
        download=getattr(cfg, 'dataset_download', False), is_training=is_training, strict=cfg.strict,
        mark_unreadable=mark_unreadable, **kwargs)


@dataclasses.dataclass
class ValidateConfig(InferenceModelOptions):
    """Options of :func:`validate`; flag names follow timm's validate.py."""
    data_dir: str = arg('', 'ImageFolder root holding <split>/<class>/<image> (or a .tar, or the root of --dataset)', V)
    split: str = arg('val', 'split to validate on: a subfolder ("" for --data-dir itself) or the data set\'s split', V)
    dataset: str = arg('', DATASET_HELP, V)
    class_map: str = arg('', CLASS_MAP_HELP, V)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, V)
    batch_size: int = arg(256, 'batch size', V, aliases=('-b',))
    workers: int = arg(4, 'data loading worker processes', V, aliases=('-j',))
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


def _checkpoint_defaults(cfg) -> Dict[str, Any]:
    """Model name, data settings and class names recorded in a safetensors file by ``epsanet train``."""
    if not cfg.checkpoint or not str(cfg.checkpoint).endswith('.safetensors') or not Path(cfg.checkpoint).is_file():
        return {}
    return read_weights_metadata(cfg.checkpoint)


def is_timm_source(checkpoint: str) -> bool:
    """``hf-hub:org/repo`` or a local folder (``epsanet convert``'s output): timm reads config.json there."""
    return str(checkpoint).startswith(('hf-hub:', 'local-dir:')) or Path(checkpoint).is_dir()


def _fetch_url(checkpoint: str, progress: bool = True) -> str:
    """An ``http(s)://`` --checkpoint is downloaded (cached, verified); returns the local path."""
    from urllib.parse import urlparse

    from ..weights.loading import WeightsError, download_url

    if urlparse(checkpoint).scheme not in ('http', 'https'):
        return checkpoint
    try:
        return str(download_url(checkpoint, progress=progress))
    except WeightsError as e:
        raise CheckpointError(str(e)) from e


def _from_timm_source(cfg, model_kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A Hub repo or local folder with timm's config.json; class names from its ``label_names``."""
    import timm

    import epsanet  # noqa: F401  (registers the models)

    from ..weights.loading import WeightsError

    src = str(cfg.checkpoint)
    name = src if src.startswith(('hf-hub:', 'local-dir:')) else f'local-dir:{src}'
    if cfg.num_classes:
        model_kwargs = dict(model_kwargs, num_classes=cfg.num_classes)
    try:
        model = timm.create_model(name, pretrained=True, **model_kwargs)  # the architecture from config.json
    except (WeightsError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f'cannot load {src}: {e}') from e
    arch = model.pretrained_cfg.get('architecture')
    if cfg.model and arch and cfg.model.split('.')[0] != arch:
        raise CheckpointError(f'{src} holds {arch} weights, not {cfg.model}: drop --model or pass --model {arch}.')
    pc = model.pretrained_cfg
    names = pc.get('label_names')
    if isinstance(names, dict):  # timm allows {index: name} with gaps
        names = [str(names.get(i, names.get(str(i), i))) for i in range(model.num_classes)]
    meta = dict(model=pc.get('architecture'))
    if names and len(names) == getattr(model, 'num_classes', len(names)):
        meta['classes'] = list(names)
    return model, meta


def load_for_inference(cfg, **model_kwargs) -> Tuple[torch.nn.Module, Dict[str, Any], Dict[str, Any]]:
    """Model, timm data config and checkpoint metadata for ``validate``, ``extract`` and ``predict``.

    ``cfg.checkpoint``: a weights file (the metadata of a training checkpoint gives the model name,
    data settings and ``classes``), an ``http(s)://`` URL (downloaded, cached), ``hf-hub:org/repo`` or
    a folder written by ``epsanet convert`` (``classes`` from config.json's ``label_names``).
    """
    if cfg.checkpoint and is_timm_source(cfg.checkpoint):
        model, meta = _from_timm_source(cfg, model_kwargs)
    else:
        if cfg.checkpoint:
            cfg = dataclasses.replace(cfg, checkpoint=_fetch_url(str(cfg.checkpoint), getattr(cfg, 'progress', True)))
        meta = _checkpoint_defaults(cfg)
        name = cfg.model or meta.get('model') or 'epsanet50'
        model = build_model(name, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                            checkpoint=cfg.checkpoint or None, adapt_classifier=False, **model_kwargs)
    data_config = data_config_for(
        model, img_size=cfg.img_size or meta.get('img_size'), crop_pct=cfg.crop_pct or meta.get('crop_pct'),
        interpolation=cfg.interpolation or meta.get('interpolation', ''), mean=cfg.mean or meta.get('mean'),
        std=cfg.std or meta.get('std'))
    return model.eval(), data_config, meta


def check_classes(model: torch.nn.Module, meta: Dict[str, Any], dataset, checkpoint: str = '') -> None:
    """Raise ``DataError`` if ``dataset``'s classes are not the ones the model predicts: another count, or other
    names than the weights' metadata records (scores against other labels would be silently wrong)."""
    classes = dataset_classes(dataset) or []
    if classes and model.num_classes != len(classes):
        raise DataError(f'the model has {model.num_classes} classes but {dataset.root} has {len(classes)} classes.')
    if classes and meta.get('classes') and list(meta['classes']) != classes:
        raise DataError(f'the classes of {dataset.root} ({", ".join(classes[:10])}, ...) are not the classes '
                        f'{checkpoint or "the weights"} were trained on ({", ".join(meta["classes"][:10])}, ...).')


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
