"""A ready model from any weights source: :func:`build_model` (training and the Python API) and
:func:`load_for_inference` (every inference command), both through timm.

Weights files (the safetensors written by ``epsanet train``, timm checkpoints, the authors'
``.pth.tar``) load through timm's own path,
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``, so the
model's ``checkpoint_filter_fn`` maps and checks the keys. Torch files are read with
``weights_only=True``.
"""
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch

from ..data import DataError, dataset_classes
from ..weights.loading import NoPretrainedWeightsError, WeightsError, download_url, weights_overlay
from ..weights.metadata import read_weights_metadata, stored_num_classes
from .data import data_config_for
from .errors import CheckpointError, ConfigError
from .flags import Options, arg

__all__ = ['InferenceModelOptions', 'build_model', 'check_classes', 'check_img_size', 'check_model_name',
           'is_timm_source', 'load_for_inference', 'min_img_size', 'weights_num_classes']

_logger = logging.getLogger(__name__)


def weights_num_classes(path: Union[str, os.PathLike], classifier: str = 'fc') -> Optional[int]:
    """Number of classes of the classifier stored in a weights file (``None`` when it has none)."""
    try:
        return stored_num_classes(path, classifier)
    except WeightsError as e:
        raise CheckpointError(str(e)) from e


def build_model(
        name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        adapt_classifier: bool = True,
        weights_flag: str = '--initial-checkpoint',
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
        weights_flag: the flag that gives a weights file, named in errors (``--checkpoint`` for inference).
        kwargs: passed to ``timm.create_model`` (``drop_rate``, ``features_only``, ...).
    """
    check_model_name(name)
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
                              f'Give a weights file with {weights_flag} FILE, or drop --pretrained for a randomly '
                              'initialised model.') from e


def _from_file(name: str, path: Path, num_classes: Optional[int], adapt: bool, kwargs: Dict[str, Any]):
    if not path.is_file():
        raise CheckpointError(f'weights file {path} does not exist.')
    meta = _weights_metadata(path) if path.suffix == '.safetensors' else {}
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


def check_model_name(name: str) -> None:
    """A :class:`ConfigError` naming the EPSANet models (and similar timm names) unless ``name`` is a timm model."""
    import epsanet  # (registers the models)

    if not timm.is_model(name):  # accepts tags, e.g. epsanet50.in1k
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise ConfigError(f'unknown model "{name}". EPSANet models: {", ".join(epsanet.MODEL_NAMES)}'
                          + (f'; similar timm names: {", ".join(close)}' if close else '') + '.')


def min_img_size(model: Union[str, torch.nn.Module]) -> int:
    """The smallest input size a model allows: its output stride (32 for EPSANet), from timm's ``feature_info``.
    A model name is built on the meta device (no memory, no weights)."""
    if isinstance(model, str):
        check_model_name(model)
        with torch.device('meta'):
            model = timm.create_model(model)
    info = getattr(model, 'feature_info', None)
    try:
        return int(info[-1]['reduction'])
    except (TypeError, IndexError, KeyError):
        return 32


def check_img_size(model: Union[str, torch.nn.Module], img_size: Optional[int], name: str = '') -> None:
    """``--img-size`` must be at least the model's output stride (:func:`min_img_size`)."""
    if img_size is None:
        return
    low = min_img_size(model)
    if img_size < low:
        name = name or (model if isinstance(model, str) else model.pretrained_cfg.get('architecture', 'the model'))
        raise ConfigError(f'--img-size must be >= {low} for {name} (its output stride); got {img_size}.')


def _weights_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    try:
        return read_weights_metadata(path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from e


M = 'model and weights'


@dataclasses.dataclass
class InferenceModelOptions(Options):
    """The model, weights and eval-transform options that every inference command shares (validate, predict,
    extract, explain, quantize): what :func:`load_for_inference` reads. Each command's config inherits them."""
    model: str = arg('', 'model name (default: the one recorded in --checkpoint, else epsanet50)', M)
    checkpoint: str = arg('', 'weights: a file (.safetensors from "epsanet train", timm or authors\' .pth), an '
                              'http(s) URL, hf-hub:org/repo or a folder from "epsanet convert"', M)
    pretrained: bool = arg(False, "use the model's registered pretrained weights", M)
    num_classes: Optional[int] = arg(None, 'number of classes (default: from the weights)', M)
    img_size: Optional[int] = arg(None, 'input size (default: recorded with the weights, else the model\'s)', M)
    crop_pct: Optional[float] = arg(None, 'centre-crop fraction (default: recorded with the weights, else the '
                                          "model's)", M)
    interpolation: str = arg('', 'resize interpolation (default: the model\'s)', M)
    mean: Optional[Tuple[float, ...]] = arg(None, 'normalisation mean (default: the weights\' / model\'s)', M)
    std: Optional[Tuple[float, ...]] = arg(None, 'normalisation std (default: the weights\' / model\'s)', M)


def _checkpoint_defaults(cfg) -> Dict[str, Any]:
    """Model name, data settings and class names recorded in a safetensors file by ``epsanet train``."""
    if not cfg.checkpoint or not str(cfg.checkpoint).endswith('.safetensors') or not Path(cfg.checkpoint).is_file():
        return {}
    return _weights_metadata(cfg.checkpoint)


def is_timm_source(checkpoint: str) -> bool:
    """``hf-hub:org/repo`` or a local folder (``epsanet convert``'s output): timm reads config.json there."""
    return str(checkpoint).startswith(('hf-hub:', 'local-dir:')) or Path(checkpoint).is_dir()


def _fetch_url(checkpoint: str, progress: bool = True) -> str:
    """An ``http(s)://`` --checkpoint is downloaded (cached, verified); returns the local path."""
    from urllib.parse import urlparse

    if urlparse(checkpoint).scheme not in ('http', 'https'):
        return checkpoint
    try:
        return str(download_url(checkpoint, progress=progress))
    except WeightsError as e:
        raise CheckpointError(str(e)) from e


def _from_timm_source(cfg, model_kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A Hub repo or local folder with timm's config.json; class names from its ``label_names``."""
    import epsanet  # noqa: F401  (registers the models)

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
                            checkpoint=cfg.checkpoint or None, adapt_classifier=False, weights_flag='--checkpoint',
                            **model_kwargs)
    check_img_size(model, cfg.img_size)
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
