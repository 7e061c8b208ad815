"""Feature extraction: embeddings for every image under a folder (``epsanet extract``).

By default the features are the pooled pre-logits (the 2048-d vector the classifier sees,
``forward_head(..., pre_logits=True)``). ``stages`` picks stage outputs instead, through
timm's ``features_only`` model: 0 = stem (stride 2), 1-4 = the four stages (strides 4-32).

The output is a ``.safetensors`` file (one tensor per output: ``features`` or ``stage<i>``) or
``.npy`` files (one per output), plus ``<name>.paths.txt``: the image paths, relative to the
data folder, one per line, in row order. Unreadable images are skipped and listed in the log.
"""
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .data import DataError, ImageFiles, find_images
from .data.folder import unreadable_error, verify_files
from .train.checkpoint import atomic_write
from .train.errors import ConfigError
from .train.flags import arg
from .train.loaders import autocast_for, eval_loader
from .train.validate import load_for_inference

__all__ = ['ExtractConfig', 'extract', 'output_paths']

_logger = logging.getLogger(__name__)

X = 'extraction'
NUM_STAGES = 5  # stem + 4 stages, timm ResNet feature_info


@dataclasses.dataclass
class ExtractConfig:
    """Options of :func:`extract`."""
    data_dir: str = arg('', 'folder of images (searched recursively; any layout)', X)
    output: str = arg('features.safetensors', 'output file: .safetensors, or .npy (one file per output)', X)
    model: str = arg('', 'model name (default: the one recorded in --checkpoint, else epsanet50)', X)
    checkpoint: str = arg('', 'weights file (.safetensors from "epsanet train", timm or authors\' .pth)', X)
    pretrained: bool = arg(False, "use the model's registered pretrained weights", X)
    num_classes: Optional[int] = arg(None, 'number of classes of the weights (default: from the checkpoint)', X)
    stages: Tuple[int, ...] = arg((), 'extract these stage outputs (0 = stem, 1-4 = stages) instead of the pooled '
                                      'pre-logits', X, metavar='STAGE')
    pool_stages: bool = arg(False, 'global-average-pool stage outputs to vectors', X)
    img_size: Optional[int] = arg(None, 'input size (default: recorded in the checkpoint, else the model\'s)', X)
    crop_pct: Optional[float] = arg(None, 'centre-crop fraction (default: checkpoint\'s, else model\'s)', X)
    interpolation: str = arg('', 'resize interpolation (default: the model\'s)', X)
    mean: Optional[Tuple[float, ...]] = arg(None, 'normalisation mean (default: checkpoint\'s, else model\'s)', X)
    std: Optional[Tuple[float, ...]] = arg(None, 'normalisation std (default: checkpoint\'s, else model\'s)', X)
    batch_size: int = arg(64, 'batch size', X, aliases=('-b',))
    workers: int = arg(4, 'data loading worker processes', X, aliases=('-j',))
    device: str = arg('', 'device (default: cuda if available, else cpu)', X)
    amp: bool = arg(False, 'mixed precision (features are stored as float32)', X)
    amp_dtype: str = arg('', 'mixed precision dtype', X, choices=('float16', 'bfloat16'))
    channels_last: bool = arg(False, 'channels-last memory layout', X)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping them', X)
    progress: bool = arg(True, 'show a progress bar', X)


def output_paths(output: str, keys: List[str]) -> Dict[str, Path]:
    """Where each output goes: one safetensors file, or ``<stem>.npy`` / ``<stem>.<key>.npy``; plus the path list."""
    out = Path(output)
    if out.suffix not in ('.safetensors', '.npy'):
        raise ConfigError(f'--output {output}: use a .safetensors or .npy file name.')
    stem = out.with_suffix('')
    files = {'paths': Path(f'{stem}.paths.txt')}
    if out.suffix == '.safetensors':
        files['tensors'] = out
    else:
        for key in keys:
            files[key] = out if len(keys) == 1 else Path(f'{stem}.{key}.npy')
    return files


def extract(cfg: ExtractConfig) -> Dict[str, Any]:
    """Embed every image under ``cfg.data_dir``; return the output files, image count and feature shapes."""
    if not cfg.data_dir:
        raise ConfigError('--data-dir is required: the folder of images to embed.')
    stages = tuple(cfg.stages)
    bad = [s for s in stages if not 0 <= s < NUM_STAGES]
    if bad:
        raise ConfigError(f'--stages {" ".join(map(str, bad))}: stages are 0 (stem) to {NUM_STAGES - 1}.')
    keys = [f'stage{s}' for s in stages] or ['features']
    files = output_paths(cfg.output, keys)
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
    if not cfg.checkpoint and not cfg.pretrained:
        _logger.warning('no --checkpoint or --pretrained: extracting features of a randomly initialised model.')
    model_kwargs = dict(features_only=True, out_indices=stages) if stages else {}
    model, data_config, _ = load_for_inference(cfg, **model_kwargs)
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    dataset = ImageFiles(paths, strict=cfg.strict)
    loader = eval_loader(dataset, data_config, cfg.batch_size, cfg.workers, device)
    autocast = autocast_for(device, cfg.amp, cfg.amp_dtype)
    chunks: Dict[str, List[torch.Tensor]] = {k: [] for k in keys}
    kept: List[int] = []
    with torch.inference_mode():
        for images, index in tqdm(loader, desc='extract', disable=not cfg.progress):
            images = images.to(device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            ok = index >= 0
            with autocast():
                if stages:
                    outs = model(images)
                else:
                    outs = [model.forward_head(model.forward_features(images), pre_logits=True)]
            for key, out in zip(keys, outs):
                out = out[ok.to(out.device)].float()
                if cfg.pool_stages and out.ndim == 4:
                    out = out.mean(dim=(2, 3))
                chunks[key].append(out.cpu())
            kept.extend(index[ok].tolist())
    if not kept:
        raise DataError(f'none of the {len(paths)} images under {root} could be read.')
    tensors = {k: torch.cat(v) for k, v in chunks.items()}
    _write(files, tensors, [paths[i].relative_to(root).as_posix() for i in kept])
    skipped = len(paths) - len(kept)
    if skipped:
        _logger.warning('%d unreadable images were skipped (paths above); they are not in %s.', skipped,
                        files['paths'])
    return dict(files={k: str(v) for k, v in files.items()}, count=len(kept), skipped=skipped,
                shapes={k: list(v.shape) for k, v in tensors.items()}, img_size=data_config['input_size'][-1])


def _write(files: Dict[str, Path], tensors: Dict[str, torch.Tensor], rel_paths: List[str]) -> None:
    if 'tensors' in files:
        from safetensors.torch import save_file
        atomic_write(files['tensors'], lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    else:
        for key, value in tensors.items():
            array = value.numpy()

            def write(tmp: str, array: np.ndarray = array) -> None:
                with open(tmp, 'wb') as f:
                    np.save(f, array)
            atomic_write(files[key], write)
    text = ''.join(p + '\n' for p in rel_paths)
    atomic_write(files['paths'], lambda tmp: Path(tmp).write_text(text))
