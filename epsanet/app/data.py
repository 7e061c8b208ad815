"""The data a command reads, from its options: the data set (:func:`dataset_from_config`), image inputs
(:func:`expand_inputs`), the eval transform (:func:`data_config_for`) and loader (:func:`eval_loader`), both
through timm's pipeline (``resolve_data_config`` / ``create_loader``)."""
import glob
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.data import create_loader, resolve_data_config

from ..data import DataError, create_image_dataset, find_images
from ..data.folder import MissingSplitError, is_image_file, unreadable_error
from .errors import ConfigError

__all__ = ['CLASS_MAP_HELP', 'DATASET_HELP', 'DOWNLOAD_HELP', 'data_config_for', 'dataset_from_config', 'eval_loader',
           'expand_inputs', 'verify_images']

# the help of the data-source flags that train, validate, predict, extract and quantize share
DATASET_HELP = ('data source, as timm\'s --dataset: "" = ImageFolder or .tar, hfds/NAME (Hugging Face datasets, e.g. '
                'a save_to_disk folder), wds/NAME (webdataset shards in --data-dir), torch/NAME (torchvision)')
CLASS_MAP_HELP = 'class map file (one class name per line, line i = class i), as timm\'s --class-map'
DOWNLOAD_HELP = 'let torch/ data sets download into --data-dir'

_GLOB_CHARS = set('*?[')


def dataset_from_config(cfg, split: str, is_training: bool = False, mark_unreadable: bool = True,
                        split_flag: str = '--split', **kwargs: Any):
    """The data set named by a config's ``dataset``/``data_dir``/``class_map``/``dataset_download``/``strict``;
    ``split_flag`` is the flag that chose ``split``, named when the folder has no such split."""
    try:
        return create_image_dataset(
            getattr(cfg, 'dataset', ''), cfg.data_dir, split, class_map=getattr(cfg, 'class_map', '') or None,
            download=getattr(cfg, 'dataset_download', False), is_training=is_training, strict=cfg.strict,
            mark_unreadable=mark_unreadable, **kwargs)
    except MissingSplitError as e:
        raise DataError(f'{e} Choose the split with {split_flag}.') from e


def verify_images(dataset, progress: bool = True) -> None:
    """``--strict``: decode every image first; fail listing those that cannot be read."""
    if not hasattr(dataset, 'verify'):  # streamed shards: an unreadable sample fails when it is reached
        return
    bad = dataset.verify(progress=progress)
    if bad:
        raise unreadable_error(bad, dataset.root)


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image paths from files, folders (recursive) and glob patterns, in the given order, without repeats."""
    out: List[str] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = [str(p) for p in find_images(path)]
            if not found:
                raise DataError(f'no images under {item} (looked for files ending with .jpg, .png, .webp, ...).')
        elif path.is_file():
            found = [item]
        elif _GLOB_CHARS & set(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file() and is_image_file(p))
            if not found:
                raise DataError(f'the pattern {item} matches no image files.')
        else:
            raise DataError(f'{item} does not exist: give image files, folders or glob patterns.')
        out.extend(found)
    return list(dict.fromkeys(out))


def data_config_for(model: torch.nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                    interpolation: str = '', mean=None, std=None) -> Dict[str, Any]:
    """timm's ``resolve_data_config``: the model's pretrained_cfg, overridden by the given values."""
    args = dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation or None,
                mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
    for key in ('mean', 'std'):
        if args[key] is not None and len(args[key]) not in (1, 3):
            raise ConfigError(f'--{key} needs 1 or 3 values, got {len(args[key])}.')
    return resolve_data_config(args, model=model)


def eval_loader(dataset, data_config: Dict[str, Any], batch_size: int, workers: int, device: torch.device,
                distributed: bool = False, prefetcher: bool = False, pin_memory: bool = False):
    """The model's evaluation transform (resize, centre crop, normalise) in timm's loader."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=workers,
        distributed=distributed, device=device, use_prefetcher=prefetcher, pin_memory=pin_memory,
        persistent_workers=False)
