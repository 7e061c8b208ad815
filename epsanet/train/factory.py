"""Create an EPSANet through timm, with weights from a registered tag or a local file.

Weights files (the safetensors written by ``epsanet train``, timm checkpoints, the authors'
``.pth.tar``) load through timm's own path,
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``, so the
model's ``checkpoint_filter_fn`` maps and checks the keys. Torch files are read with
``weights_only=True``.
"""
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch
from safetensors import SafetensorError, safe_open

from ..weights.loading import NoPretrainedWeightsError, WeightsError, weights_overlay
from .checkpoint import read_weights_metadata
from .errors import CheckpointError, ConfigError

__all__ = ['build_model', 'weights_num_classes']

_logger = logging.getLogger(__name__)


def weights_num_classes(path: Union[str, os.PathLike], classifier: str = 'fc') -> Optional[int]:
    """Number of classes of the classifier stored in a weights file (``None`` when it has none)."""
    key = f'{classifier}.weight'
    if str(path).endswith('.safetensors'):
        try:
            with safe_open(str(path), framework='pt') as f:
                return f.get_slice(key).get_shape()[0] if key in f.keys() else None
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'cannot read {path} as safetensors ({e}).') from e
    from timm.models import load_state_dict
    try:
        state_dict = load_state_dict(str(path), use_ema=False)
    except Exception as e:
        raise CheckpointError(f'cannot read weights {path} ({type(e).__name__}: {e}). Torch files are read with '
                              'weights_only=True; convert other formats to safetensors.') from e
    for k, v in state_dict.items():
        if k.removeprefix('module.') == key:
            return v.shape[0]
    return None


def build_model(
        name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        adapt_classifier: bool = True,
        **kwargs: Any,
) -> torch.nn.Module:
    """``timm.create_model(name, ...)`` with clear errors.

    Args:
        name: a registered model name (``epsanet50``, ...).
        num_classes: classifier size; ``None`` takes it from ``checkpoint``, else timm's default.
        pretrained: load the weights registered for ``name`` (ignored when ``checkpoint`` is given).
        checkpoint: weights to start from: a local file, or any other source
            :func:`epsanet.weights.loading.weights_overlay` takes (URL, ``hf-hub:org/name``, folder).
        adapt_classifier: when the file's classifier has another size than ``num_classes``, start a new
            classifier (fine-tuning); when ``False`` that is an error (validation).
        kwargs: passed to ``timm.create_model`` (``drop_rate``, ``features_only``, ...).
    """
    import epsanet  # noqa: F401  (registers the models)

    if not timm.is_model(name):  # accepts tags, e.g. epsanet50.in1k
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise ConfigError(f'unknown model "{name}". EPSANet models: {", ".join(epsanet.MODEL_NAMES)}'
                          + (f'; similar timm names: {", ".join(close)}' if close else '') + '.')
    if checkpoint and os.path.isfile(checkpoint):
        return _from_file(name, Path(checkpoint), num_classes, adapt_classifier, kwargs)
    if checkpoint:
        return _from_source(name, os.fspath(checkpoint), num_classes, kwargs)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except NoPretrainedWeightsError as e:
        raise CheckpointError(f'no pretrained weights are registered for {name} (the authors released none). '
                              'Start from a weights file with --initial-checkpoint FILE, or drop --pretrained '
                              'to train from random initialisation.') from e


def _from_file(name: str, path: Path, num_classes: Optional[int], adapt: bool, kwargs: Dict[str, Any]):
    if not path.is_file():
        raise CheckpointError(f'weights file {path} does not exist.')
    meta = read_weights_metadata(path) if path.suffix == '.safetensors' else {}
    trained_as = meta.get('model')
    if trained_as and trained_as != name:
        raise CheckpointError(f'{path} holds weights of {trained_as}, not {name}: pass --model {trained_as}.')
    file_classes = weights_num_classes(path)
    features = kwargs.get('features_only', False)
    if num_classes is None:
        num_classes = file_classes
    elif file_classes is not None and num_classes != file_classes and not features:
        if not adapt:
            raise CheckpointError(f'{path} has a {file_classes}-class classifier but {num_classes} classes were '
                                  'asked for: use the data the weights were trained on, or '
                                  f'--num-classes {file_classes}.')
        _logger.info('%s has %d classes; starting a new %d-class classifier.', path, file_classes, num_classes)
    if num_classes is not None and not features:
        kwargs['num_classes'] = num_classes
    # timm drops the file's classifier when its size differs from the model's: tell it the file's size.
    overlay = dict(weights_overlay(path), num_classes=file_classes if file_classes is not None else -1)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except WeightsError as e:  # unreadable, corrupt or unsafe file: its own message says what to do
        raise CheckpointError(f'cannot load {path}: {e}') from e
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f'the weights in {path} do not fit {name}: {e}') from e


def _from_source(name: str, source: str, num_classes: Optional[int], kwargs: Dict[str, Any]):
    """Weights from a URL, Hub id or folder (fetched and verified by the weights loader)."""
    try:
        overlay = weights_overlay(source)
    except FileNotFoundError as e:
        raise CheckpointError(f'weights file {source} does not exist (nor is it a URL or an hf-hub: id).') from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except WeightsError as e:
        raise CheckpointError(f'cannot load {source}: {e}') from e
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f'the weights in {source} do not fit {name}: {e}') from e
