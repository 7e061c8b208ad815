"""``epsanet extract``: embeddings of every image under a folder, streamed to disk.

By default the features are the pooled pre-logits (the vector the classifier sees,
``forward_head(..., pre_logits=True)``). ``stages`` picks stage outputs instead, through timm's
``features_only`` model: 0 = stem (stride 2), 1-4 = the four stages (strides 4-32).

The images are cut into chunks of consecutive images (as many as fit a ``--shard-size`` shard).
Under ``torchrun`` the unfinished chunks are dealt out to the processes in turn, so every image
is read by exactly one process and no sampler pads anything; the first process waits for the
others' chunk records and merges the index in image order. Each chunk is written as it is computed
(:mod:`~epsanet.features.writers`), so memory does not grow with the number of images, and a
finished chunk is never redone: re-running an interrupted command finishes the rest. The layout
on disk is described in :mod:`~epsanet.features.output`; :func:`~epsanet.features.load` reads it.
"""
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from ..app.data import dataset_from_config
from ..app.device import DistInfo, autocast_for, init_distributed
from ..app.errors import ConfigError
from ..app.model import load_for_inference
from ..app.outputs import config_inputs
from ..data import DataError, ImageFiles, IndexedSamples, find_images
from ..data.folder import unreadable_error, verify_files
from ..progress import progress
from .config import ExtractConfig, parse_size
from .output import Layout, differences, fingerprint, read_json, write_json
from .writers import NpyWriter, ShardWriter, TensorSpec

__all__ = ['extract', 'build_dataset']

_logger = logging.getLogger(__name__)

NUM_STAGES = 5  # stem + 4 stages, timm ResNet feature_info
HEADER_BYTES = 256  # room left in a shard for its safetensors header
MIN_CHUNKS_PER_PROCESS = 4  # small outputs are still cut so that every process gets work


def build_dataset(cfg: ExtractConfig) -> Tuple[Dataset, List[str]]:
    """The images to embed and their names (the row keys: paths relative to ``--data-dir``), in row order.

    This is the one place that chooses the data source: a folder searched recursively, or with
    ``--dataset`` any source of :func:`~epsanet.data.create_image_dataset` (a folder of class folders or a
    .tar, ``hfds/``, ``torch/``, or ``wds/`` shards read by sample with rows keyed ``<shard>/<key>.<ext>``).
    The dataset gives ``(image, index)`` samples, ``index < 0`` for an image that cannot be read, and takes
    its transform through a ``transform`` attribute.
    """
    if cfg.dataset:
        return _named_dataset(cfg)
    if not cfg.data_dir:
        raise ConfigError('--data-dir is required: the folder of images to embed.')
    root = Path(cfg.data_dir)
    if not root.exists():
        raise DataError(f'data dir {root} does not exist.')
    paths = find_images(root)
    if not paths:
        raise DataError(f'no images under {root} (looked for files ending with .jpg, .png, .webp, ...).')
    if cfg.strict:
        bad = verify_files(paths, progress=cfg.progress)
        if bad:
            raise unreadable_error(bad, root)
    return ImageFiles(paths, strict=cfg.strict), [p.relative_to(root).as_posix() for p in paths]


def _named_dataset(cfg: ExtractConfig) -> Tuple[Dataset, List[str]]:
    dataset = dataset_from_config(cfg, cfg.split, labels=False)  # random access (wds/: indexed shards)
    if cfg.strict and hasattr(dataset, 'verify'):
        bad = dataset.verify(progress=cfg.progress)
        if bad:
            raise unreadable_error(bad, getattr(dataset, 'root', cfg.data_dir))
    if len(dataset) == 0:
        raise DataError(f'--dataset {cfg.dataset} holds no images.')
    names = [str(dataset.filename(i)) for i in range(len(dataset))]
    if len(set(names)) < len(names):  # e.g. Hugging Face data sets keep only base names: key rows by index too
        _logger.info('--dataset %s names some images alike; rows are keyed "INDEX/NAME".', cfg.dataset)
        names = [f'{i}/{n}' for i, n in enumerate(names)]
    return IndexedSamples(dataset), names


def inference_form(cfg: ExtractConfig, device: torch.device) -> Dict[str, bool]:
    """How extraction runs on ``device``: with ``--optimize`` (the default) the fastest form there,
    ``optimize_for_inference`` on CPU, channels_last and AMP on CUDA; pinned host memory for CUDA."""
    cuda = device.type == 'cuda'
    return dict(optimize_for_inference=cfg.optimize and device.type == 'cpu',
                amp=cfg.amp or (cfg.optimize and cuda), channels_last=cfg.channels_last or (cfg.optimize and cuda),
                pin_memory=cuda)


def _prepare_model(cfg: ExtractConfig, device: torch.device, stages: Tuple[int, ...]):
    """The model in its fastest inference form for ``device``, its data config, and the input settings."""
    model_kwargs = dict(features_only=True, out_indices=stages) if stages else {}
    with torch.random.fork_rng(devices=[]):  # weights that no file sets are the same in every process and re-run
        torch.manual_seed(0)
        model, data_config, _ = load_for_inference(cfg, **model_kwargs)
    model.to(device)
    form = inference_form(cfg, device)
    amp, channels_last = form['amp'], form['channels_last']
    if form['optimize_for_inference']:
        from .. import optimize_for_inference
        optimize_for_inference(model)  # NCHW input is fine
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, data_config, autocast_for(device, amp, cfg.amp_dtype), channels_last


def _forward(model, images: torch.Tensor, stages: Tuple[int, ...], pool: bool) -> List[torch.Tensor]:
    outs = model(images) if stages else [model.forward_head(model.forward_features(images), pre_logits=True)]
    outs = [o.float() for o in outs]
    return [o.mean(dim=(2, 3)) if pool and o.ndim == 4 else o for o in outs]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()


def _plan(cfg: ExtractConfig, names: Sequence[str], specs: Sequence[TensorSpec], data_config: Dict[str, Any],
          model: torch.nn.Module, world: int) -> Dict[str, Any]:
    shard_bytes = parse_size(cfg.shard_size)
    by_size = max(1, (shard_bytes - HEADER_BYTES) // max(s.row_bytes for s in specs))
    batch_size = max(1, cfg.batch_size)
    balanced = math.ceil(len(names) / (MIN_CHUNKS_PER_PROCESS * world) / batch_size) * batch_size
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None
    return dict(
        images=len(names), image_list_sha256=fingerprint(names),
        model=model.pretrained_cfg.get('architecture', cfg.model or 'epsanet50'),
        weights=dict(sha256=_file_sha256(str(checkpoint))) if checkpoint and checkpoint.is_file() else
        dict(pretrained=cfg.pretrained, checkpoint=cfg.checkpoint or None),
        stages=list(cfg.stages), pool_stages=cfg.pool_stages,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        tensors={s.name: s.as_dict() for s in specs}, chunk_images=_whole_batches(min(by_size, balanced), batch_size))


def _whole_batches(images: int, batch_size: int) -> int:
    """``images`` rounded down to whole batches (chunks end where batches do), when it is more than one."""
    return images - images % batch_size if images > batch_size else max(1, images)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        torch_dist.barrier()


def extract(cfg: ExtractConfig) -> Dict[str, Any]:
    """Embed every image under ``cfg.data_dir`` into ``cfg.output``; return the output's summary.

    Runs as one process, or as one of several under ``torchrun`` (each process takes its share
    of the chunks; the first one merges the index). Returns ``output``, ``index``, ``count``,
    ``skipped``, ``shapes`` (per output, rows first), ``img_size``, ``chunks`` and ``resumed``
    (chunks a previous run had finished).
    """
    stages = tuple(cfg.stages)
    bad = [s for s in stages if not 0 <= s < NUM_STAGES]
    if bad:
        raise ConfigError(f'--stages {" ".join(map(str, bad))}: stages are 0 (stem) to {NUM_STAGES - 1}.')
    keys = [f'stage{s}' for s in stages] or ['features']
    layout = Layout(cfg.output, keys)
    parse_size(cfg.shard_size)
    layout.check_policy(config_inputs(cfg), cfg.overwrite)
    dataset, names = build_dataset(cfg)
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info, layout, dataset, names, stages, keys)
    finally:
        if info.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _run(cfg: ExtractConfig, info: DistInfo, layout: Layout, dataset, names: List[str], stages: Tuple[int, ...],
         keys: List[str]) -> Dict[str, Any]:
    if not cfg.checkpoint and not cfg.pretrained and info.is_primary:
        _logger.warning('no --checkpoint or --pretrained: extracting features of a randomly initialised model.')
    device = info.device
    model, data_config, autocast, channels_last = _prepare_model(cfg, device, stages)
    with torch.inference_mode(), autocast():
        probe = _forward(model, torch.zeros(1, *data_config['input_size'], device=device), stages, cfg.pool_stages)
    specs = [TensorSpec(k, p.shape[1:]) for k, p in zip(keys, probe)]
    plan = _plan(cfg, names, specs, data_config, model, info.world_size)
    summary = dict(output=str(layout.output), index=str(layout.index), img_size=data_config['input_size'][-1])

    finished = layout.finished_plan()
    if finished is not None and not differences(finished, plan):
        index = read_json(layout.index)
        _logger.info('%s is complete (same images and settings): nothing to do.', layout.index)
        return dict(summary, **_summary(index), chunks=len(index.get('shards', [])), resumed=len(index['shards']))
    if finished is not None and not cfg.overwrite:
        raise ConfigError(f'{layout.output} holds a finished extraction with other settings '
                          f'({", ".join(differences(finished, plan))} differ); pass --overwrite to replace it, '
                          'or choose another --output.')
    if info.is_primary:
        layout.prepare(plan, specs, cfg.overwrite)
    _barrier(info)
    plan = read_json(layout.plan_file)
    size = plan['chunk_images']
    chunks = [(c, s, min(s + size, len(names))) for c, s in enumerate(range(0, len(names), size))]
    pending = [ch for ch in chunks if layout.completed(ch[0]) is None]
    _barrier(info)  # every process has seen the same finished chunks before any writes new ones
    todo = pending[info.rank::info.world_size]
    resumed = len(chunks) - len(pending)
    if resumed and info.is_primary:
        _logger.info('resuming: %d of %d chunks are already complete; %d to go.', resumed, len(chunks), len(pending))
    dataset.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode', 'center'))
    _extract_chunks(cfg, info, layout, model, dataset, todo, specs, stages, autocast, channels_last)
    if not info.is_primary:
        return dict(summary, count=None, chunks=len(chunks), resumed=resumed)
    records = _wait_for_records(layout, [c for c, _, _ in chunks], mine={c for c, _, _ in todo})
    if not any(r['count'] for r in records):
        raise DataError(f'none of the {len(names)} images under {cfg.data_dir} could be read (paths above).')
    index = layout.finish(plan, specs, names, records,
                          dict(model=plan['model'], img_size=summary['img_size'], data_dir=str(cfg.data_dir)))
    if index['skipped']:
        _logger.warning('%d unreadable images were skipped (listed above and in %s); they have no row.',
                        len(index['skipped']), layout.index)
    return dict(summary, **_summary(index), chunks=len(chunks), resumed=resumed)


def _wait_for_records(layout: Layout, chunks: List[int], mine: Set[int], poll: float = 0.5,
                      log_every: float = 60.0) -> List[Dict[str, Any]]:
    """The records of all chunks, waiting for those other processes are still writing.

    A file-based wait rather than a collective barrier: no process-group timeout however long the
    others take; if one of them fails, torchrun stops this process too.
    """
    records: Dict[int, Dict[str, Any]] = {}
    last_log = time.monotonic()
    while True:
        for c in chunks:
            if c not in records:
                record = layout.completed(c)
                if record is not None:
                    records[c] = record
                elif c in mine:
                    raise DataError(f'chunk {c} of {layout.output} has no complete record after extraction; '
                                    're-run the same command to redo it.')
        if len(records) == len(chunks):
            return [records[c] for c in chunks]
        if time.monotonic() - last_log > log_every:
            last_log = time.monotonic()
            _logger.info('waiting for the other processes: %d of %d chunks to go.', len(chunks) - len(records),
                         len(chunks))
        time.sleep(poll)


def _summary(index: Dict[str, Any]) -> Dict[str, Any]:
    return dict(count=index['num_rows'], skipped=len(index['skipped']),
                shapes={k: [index['num_rows'], *v['shape']] for k, v in index['tensors'].items()})


class _BatchSampler:
    """The image indices of each batch, made as needed (a list of them all would grow with the data set)."""

    def __init__(self, batches: Sequence[Tuple[int, ...]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for *_, b0, b1 in self.batches:
            yield list(range(b0, b1))


def _extract_chunks(cfg: ExtractConfig, info: DistInfo, layout: Layout, model, dataset, todo, specs, stages,
                    autocast, channels_last: bool) -> None:
    """Run the model over this process's unfinished chunks, writing each as it goes."""
    batches = [(c, s, e, b, min(b + cfg.batch_size, e)) for c, s, e in todo for b in range(s, e, cfg.batch_size)]
    if not batches:
        return
    cuda = info.device.type == 'cuda'
    loader = DataLoader(dataset, batch_sampler=_BatchSampler(batches), num_workers=cfg.workers,
                        pin_memory=inference_form(cfg, info.device)['pin_memory'], persistent_workers=False)
    desc = 'extract' if info.world_size == 1 else f'extract (rank 0 of {info.world_size})'
    bar = progress(total=sum(e - s for _, s, e in todo), desc=desc, unit='img',
                   enabled=cfg.progress and info.is_primary)
    writer, skipped, count = None, [], 0
    start_time, images_done = time.perf_counter(), 0
    try:
        for (chunk, start, end, b0, b1), (images, index) in zip(batches, loader):
            if writer is None:
                writer = (ShardWriter(layout.shard_dir, specs, chunk, end - start) if layout.kind != 'npy' else
                          NpyWriter({s.name: layout.npy_part(s.name) for s in specs}, specs, start, end - start))
                skipped, count = [], 0
            images = images.to(info.device, non_blocking=cuda)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                outs = _forward(model, images, stages, cfg.pool_stages)
            ok = (index >= 0).numpy()
            positions = np.arange(b0 - start, b1 - start)
            rows = {s.name: o.cpu().contiguous().numpy()[ok] for s, o in zip(specs, outs)}
            writer.add(rows, positions[ok])
            skipped.extend(int(p) for p in positions[~ok])
            count += int(ok.sum())
            bar.update(b1 - b0)
            images_done += b1 - b0
            if b1 == end:
                record = writer.close()
                writer = None
                write_json(layout.record_file(chunk), dict(record, chunk=chunk, images=[start, end], count=count,
                                                           skipped=skipped))
    except KeyboardInterrupt:
        _logger.warning('interrupted: the finished chunks are kept; run the same command again to finish.')
        raise
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
    elapsed = time.perf_counter() - start_time
    _logger.info('rank %d: %d images in %.1fs (%.1f img/s)', info.rank, images_done, elapsed,
                 images_done / max(elapsed, 1e-9))
