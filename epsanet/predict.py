"""Classify images with trained weights: top-k class names and probabilities (``epsanet predict``).

Inputs are image files, folders (searched recursively) and glob patterns, or a whole data source
(``data_dir`` + ``dataset``, as in ``epsanet validate``; ``wds/`` shards are indexed once and their rows
named ``<shard>/<key>.<ext>``). The model comes from any weights source
:func:`~epsanet.train.validate.load_for_inference` reads (a training checkpoint, a timm or
authors' file, a URL, ``hf-hub:org/repo``, a folder written by ``epsanet convert``), and each image
goes through the model's eval transform (timm's ``resolve_data_config`` + ``create_transform``).

Class names come with the weights: the ``classes`` a training checkpoint records, or the
``label_names`` of a Hub folder's config.json. Without them the labels are class indices and the
result says so (``label_source == 'indices'``). An unreadable image gets no row: it is logged with
its path and listed in ``skipped`` (``strict=True`` makes it an error).
"""
import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .app.data import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP, dataset_from_config, eval_loader, expand_inputs
from .app.device import autocast_for
from .app.errors import ConfigError
from .app.flags import arg
from .app.model import InferenceModelOptions, load_for_inference
from .app.outputs import check_output_file, config_inputs, overwrite_option
from .data import DataError, ImageFiles, IndexedSamples
from .data.folder import skipped_index, unreadable_error, verify_files
from .files import atomic_write
from .progress import progress

__all__ = ['PredictConfig', 'PredictResult', 'predict', 'write_results']

_logger = logging.getLogger(__name__)

P = 'prediction'


@dataclasses.dataclass
class PredictConfig(InferenceModelOptions):
    """Options of :func:`predict`; flag names follow timm's inference.py where they overlap."""
    inputs: Tuple[str, ...] = arg((), 'image files, folders (searched recursively) or glob patterns', P,
                                  metavar='PATH')
    data_dir: str = arg('', 'instead of --inputs: a data source root, read like "epsanet validate" (see --dataset)', P)
    dataset: str = arg('', DATASET_HELP, P)
    split: str = arg('', 'split of --data-dir/--dataset to predict ("" = --data-dir itself)', P)
    class_map: str = arg('', CLASS_MAP_HELP, P)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, P)
    topk: int = arg(1, 'how many classes to report per image', P)
    results_file: str = arg('', 'write the predictions to this .csv or .json file', P)
    overwrite: bool = overwrite_option(P)
    batch_size: int = arg(32, 'batch size', P, aliases=('-b',))
    workers: int = arg(2, 'data loading worker processes', P, aliases=('-j',))
    device: str = arg('', 'device (default: cuda if available, else cpu)', P)
    amp: bool = arg(False, 'mixed precision (bfloat16 on CPU)', P)
    amp_dtype: str = arg('', 'mixed precision dtype', P, choices=('float16', 'bfloat16'))
    channels_last: bool = arg(False, 'channels-last memory layout', P)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping and counting them', P)
    progress: bool = arg(True, 'show a progress bar', P)


@dataclasses.dataclass
class PredictResult:
    """``rows``: one ``{"filename", "label": [top-k names], "prob": [top-k probabilities], "index": [...]}``
    per readable image, in input order; ``skipped``: the unreadable files; ``label_source``:
    ``"checkpoint"`` (names recorded with the weights) or ``"indices"`` (none recorded)."""
    rows: List[Dict[str, Any]]
    skipped: List[str]
    label_source: str
    classes: List[str]
    img_size: int
    results_file: Optional[str] = None

    @property
    def count(self) -> int:
        return len(self.rows)


def _inputs(cfg: PredictConfig) -> Tuple[Dataset, List[str], str]:
    """The data set of (image, index) samples, the filename of each index, and where the images are."""
    if cfg.inputs and cfg.data_dir:
        raise ConfigError('give either images (--inputs / positional paths) or --data-dir, not both.')
    if cfg.inputs:
        paths = expand_inputs(cfg.inputs)
        if cfg.strict:
            bad = verify_files(paths, progress=cfg.progress)
            if bad:
                raise unreadable_error(bad, ', '.join(cfg.inputs))
        return ImageFiles(paths, strict=cfg.strict), paths, ', '.join(cfg.inputs)
    if not cfg.data_dir and not cfg.dataset:
        raise ConfigError('nothing to predict: give image files, folders or glob patterns (or --data-dir).')
    dataset = dataset_from_config(cfg, cfg.split, labels=False)  # random access (wds/: indexed shards)
    if cfg.strict and hasattr(dataset, 'verify'):
        bad = dataset.verify(progress=cfg.progress)
        if bad:
            raise unreadable_error(bad, dataset.root)
    names = [dataset.filename(i) for i in range(len(dataset))]
    return IndexedSamples(dataset), names, str(dataset.root)


def predict(cfg: PredictConfig) -> PredictResult:
    """Top-k predictions for every readable image of ``cfg``; writes ``cfg.results_file`` when given."""
    if cfg.topk < 1:
        raise ConfigError(f'--topk must be at least 1, got {cfg.topk}.')
    if cfg.results_file and Path(cfg.results_file).suffix.lower() not in ('.csv', '.json'):
        raise ConfigError(f'--results-file {cfg.results_file}: use a .csv or .json file name.')
    check_output_file(cfg.results_file, config_inputs(cfg), cfg.overwrite, '--results-file')
    dataset, filenames, where = _inputs(cfg)
    if not cfg.checkpoint and not cfg.pretrained:
        _logger.warning('no --checkpoint or --pretrained: predicting with a randomly initialised model.')
    model, data_config, meta = load_for_inference(cfg)
    num_classes = model.num_classes
    classes = list(meta.get('classes') or [])
    label_source = 'checkpoint'
    if len(classes) != num_classes:
        _logger.warning('the weights carry no class names: labels are class indices 0-%d.', num_classes - 1)
        classes, label_source = [str(i) for i in range(num_classes)], 'indices'
    k = min(cfg.topk, num_classes)
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = eval_loader(dataset, data_config, cfg.batch_size, cfg.workers, device)
    autocast = autocast_for(device, cfg.amp, cfg.amp_dtype)
    rows: List[Dict[str, Any]] = []
    skipped: List[str] = []
    with torch.inference_mode():
        for images, index in progress(loader, desc='predict', unit='batch', enabled=cfg.progress):
            ok = index >= 0
            skipped.extend(filenames[skipped_index(i)] for i in index[~ok].tolist())
            if not bool(ok.any()):
                continue
            images = images[ok.to(images.device)].to(device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(images)
            probs, top = logits.float().softmax(dim=1).topk(k, dim=1)
            for i, p, t in zip(index[ok].tolist(), probs.cpu().tolist(), top.cpu().tolist()):
                rows.append(dict(filename=filenames[i], label=[classes[c] for c in t], prob=p, index=t))
    if not rows:
        raise DataError(f'none of the {len(filenames)} images ({where}) could be read.')
    if skipped:
        _logger.warning('%d unreadable images were skipped and have no prediction: %s', len(skipped),
                        ', '.join(skipped))
    result = PredictResult(rows, skipped, label_source, classes, data_config['input_size'][-1],
                           cfg.results_file or None)
    if cfg.results_file:
        write_results(result.rows, cfg.results_file)
    return result


def write_results(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Write predictions atomically: ``.json``, a list of ``{"filename", "label", "prob"}`` records; ``.csv``,
    one row per image (``filename,label,prob`` for top-1, ``label_1..k,prob_1..k`` for top-k).

    A file name that is not valid UTF-8 is kept losslessly: the CSV holds its original bytes
    (``surrogateescape``), the JSON its undecodable bytes as ``\\udcXX`` escapes, which
    ``json.load`` followed by ``os.fsencode`` turns back into the original bytes."""
    if Path(path).suffix.lower() == '.json':
        records = [dict(filename=r['filename'], label=r['label'], prob=r['prob']) for r in rows]
        text = json.dumps(records, indent=1)
    else:
        k = len(rows[0]['label']) if rows else 1
        if k == 1:
            header = ['filename', 'label', 'prob']
        else:
            header = ['filename'] + [f'label_{j + 1}' for j in range(k)] + [f'prob_{j + 1}' for j in range(k)]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r['filename'], *r['label'], *(f'{p:.6f}' for p in r['prob'])])
        text = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8', errors='surrogateescape'))
