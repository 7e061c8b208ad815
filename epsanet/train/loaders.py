"""Data loaders and autocast through timm's pipeline (``create_loader`` / ``create_transform``)."""
import contextlib
import functools
from typing import Any, Callable, Dict, Optional

import torch
from timm.data import create_loader, resolve_data_config

from .errors import ConfigError

__all__ = ['data_config_for', 'eval_loader', 'autocast_for']


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


def autocast_for(device: torch.device, enabled: bool, dtype: str = '') -> Callable[[], Any]:
    """A context factory: ``torch.autocast`` (float16 on CUDA, bfloat16 elsewhere by default) or a no-op."""
    if not enabled:
        return contextlib.nullcontext
    name = dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    return functools.partial(torch.autocast, device_type=device.type, dtype=getattr(torch, name))
