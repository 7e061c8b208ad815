"""Download, verify and read EPSANet weights safely; the pretrained path of ``timm.create_model``.

Every way timm offers to point at weights works for EPSANet models, and all of them go through
:func:`build_pretrained`, which ``epsanet.models.epsanet._create_epsanet`` calls:

* a registry tag: ``timm.create_model("epsanet50.in1k", pretrained=True)``;
* a file: ``pretrained_cfg_overlay=dict(file="w.safetensors")`` (.safetensors, .pth, .pth.tar, .bin:
  timm state dicts, the authors' checkpoints, this project's training checkpoints);
* a URL: ``pretrained_cfg_overlay=dict(url="https://...", sha256="...")``;
* the Hub: ``timm.create_model("hf-hub:org/repo", pretrained=True)`` (config.json in timm's format),
  or ``pretrained_cfg_overlay=dict(hf_hub_id="org/repo")``; also timm's ``local-dir:`` folders.

The file is fetched (``torch.hub.download_url_to_file`` / ``huggingface_hub.hf_hub_download``, with
progress bars and their caches), its sha256 checked where known (registry entry or an ``sha256``
overlay key), read with safetensors or ``torch.load(weights_only=True)`` (nothing pickled is ever
executed), and handed to timm as an in-memory state dict. timm then adapts ``in_chans`` and
``num_classes`` and ``checkpoint_filter_fn`` maps the authors' names and reports mismatches.
"""
import argparse
import hashlib
import http.client
import logging
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import torch
from timm.models import clean_state_dict, resolve_pretrained_cfg
from timm.models import load_state_dict as timm_load_state_dict

from .._compat import safe_globals
from ..errors import EpsanetError
from .registry import find_entry, registered_weights

__all__ = [
    'WeightsError', 'NoPretrainedWeightsError', 'WeightsDownloadError', 'WeightsIntegrityError',
    'UnsafeCheckpointError', 'sha256_file', 'read_checkpoint', 'read_state_dict', 'download_url',
    'download_from_hub', 'fetch_weights', 'build_pretrained', 'create_pretrained', 'no_weights_message',
    'weights_overlay',
]

_logger = logging.getLogger(__name__)

HUB_FILENAMES = ('model.safetensors', 'pytorch_model.bin')
_STATE_DICT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')  # timm's preference order
_SAFETENSORS_EXT = '.safetensors'


class WeightsError(EpsanetError, RuntimeError):
    """Base class of the errors below; each message says what went wrong and what to do."""


class NoPretrainedWeightsError(WeightsError):
    """``pretrained=True`` but no weights source is registered or given."""


class WeightsDownloadError(WeightsError):
    """A download failed (network, missing repo/file, offline without a cached copy)."""


class WeightsIntegrityError(WeightsError):
    """A file is truncated, corrupt, or its sha256/size differs from the expected one."""


class UnsafeCheckpointError(WeightsError):
    """A pickled checkpoint needs Python objects other than tensors: refused, nothing executed."""


# ---------------------------------------------------------------------------------------------
# reading files

def sha256_file(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Union[str, Path], sha256: Optional[str] = None, file_size: Optional[int] = None) -> None:
    """Raise :class:`WeightsIntegrityError` if the file's size or sha256 is not the expected one."""
    path = Path(path)
    if file_size is not None and path.stat().st_size != int(file_size):
        raise WeightsIntegrityError(
            f'{path} has {path.stat().st_size} bytes, expected {file_size}: it is truncated or not the '
            'registered file. Delete it and download it again.')
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise WeightsIntegrityError(
                f'sha256 mismatch for {path}: expected {sha256.lower()}, got {actual}. The file is corrupt, '
                'truncated or not the one registered. Delete it and download it again.')


def _is_safetensors(path: Path) -> bool:
    if path.name.endswith(_SAFETENSORS_EXT):
        return True
    # safetensors layout: little-endian u64 header length, then a JSON header starting with '{'
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < (1 << 27)


def _corrupt(path: Path, err: BaseException) -> WeightsIntegrityError:
    return WeightsIntegrityError(
        f'Could not read the weights file {path} ({type(err).__name__}: {err}). It is truncated or corrupt, '
        'or not a weights file: download or copy it again (compare its sha256 with the published one).')


def _unsafe(path: Path, err: BaseException) -> UnsafeCheckpointError:
    # torch's own text suggests weights_only=False, which no command offers and which would run the file's code
    return UnsafeCheckpointError(
        f'Refused to load {path}: it is not a plain tensor checkpoint (it is corrupt, or it contains pickled '
        'Python objects other than tensors). Loading such objects could run arbitrary code, so nothing from it was '
        'executed. If you trust its origin, re-save only its state dict (or convert it to safetensors) in a '
        'trusted environment and load that.')


def read_checkpoint(path: Union[str, Path]) -> Any:
    """Load a weights file safely: safetensors first, else ``torch.load(weights_only=True)``.

    Only tensors and plain containers are accepted from pickles (plus ``argparse.Namespace``, which
    timm training checkpoints store); a checkpoint that needs anything else raises
    :class:`UnsafeCheckpointError` and nothing from it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No weights file at {path}.')
    if _is_safetensors(path):
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:  # SafetensorError has no importable base class across versions
            raise _corrupt(path, e) from e
    try:
        with safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, e) from e
    except RuntimeError as e:
        if 'weights_only' in str(e):  # torch >= 2.6 reports blocked globals as a RuntimeError
            raise _unsafe(path, e) from e
        raise _corrupt(path, e) from e
    except (EOFError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def _pick_state_dict(checkpoint: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                _logger.info(f'Using "{key}" of {path.name}')
                checkpoint = checkpoint[key]
                break
    return _only_tensors(checkpoint, path)


def _only_tensors(state_dict: Any, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightsIntegrityError(f'{path} holds no state dict (a mapping of parameter names to tensors).')
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsIntegrityError(f'{path} holds no tensors: it is not a weights file.')
    return clean_state_dict(tensors)


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The model state dict stored in a weights file (EMA weights preferred), read by timm's
    ``load_state_dict`` with ``weights_only=True``.

    Accepts safetensors files, timm state dicts, the authors' ``{'state_dict': {'module.…'}}``
    checkpoints and training checkpoints (``state_dict``/``model``/``state_dict_ema`` keys).
    ``module.`` and ``_orig_mod.`` prefixes are removed. A safetensors file without the
    ``.safetensors`` suffix is recognised by its header. Raises :class:`UnsafeCheckpointError` for a
    pickle that needs more than tensors (nothing is executed) and :class:`WeightsIntegrityError` for a
    truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No weights file at {path}.')
    if _is_safetensors(path) and path.suffix != _SAFETENSORS_EXT:
        return _pick_state_dict(read_checkpoint(path), path)
    try:
        with safe_globals([argparse.Namespace]):
            state_dict = timm_load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        unpickling = next((c for c in _causes(e) if isinstance(c, pickle.UnpicklingError)), None)
        if unpickling is not None or 'weights_only' in str(e):  # timm re-raises it as a RuntimeError
            raise _unsafe(path, e) from e
        raise _corrupt(path, e) from e
    return _only_tensors(state_dict, path)


def _causes(err: BaseException):
    """``err`` and the exceptions it was raised from."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


# ---------------------------------------------------------------------------------------------
# downloading

def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get('HF_HUB_OFFLINE', '').upper() in {'1', 'ON', 'YES', 'TRUE'}


def _how_to_load_file(model: str = 'epsanet50') -> str:
    return (f'To load it from a file instead, download it by other means and use '
            f'timm.create_model("{model}", pretrained=True, pretrained_cfg_overlay=dict(file="path/to/file")).')


def default_cache_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints/epsanet`` (next to timm's URL cache)."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / 'epsanet'


def download_url(
        url: str,
        sha256: Optional[str] = None,
        file_size: Optional[int] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        progress: bool = True,
) -> Path:
    """Download ``url`` into the cache (or reuse the cached copy) and verify it.

    The file is fetched by ``torch.hub.download_url_to_file`` (with a progress bar) under a temporary
    name, checked against the announced length and the expected size/sha256, and only then renamed
    into the cache, so a truncated or wrong download never reaches it. A cached copy that fails
    verification is deleted and fetched again. In offline mode (``HF_HUB_OFFLINE=1``) only the cache
    is used.
    """
    name = os.path.basename(urlparse(url).path) or 'weights'
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dst = Path(cache_dir or default_cache_dir()) / url_key / name
    if dst.is_file():
        try:
            verify_file(dst, sha256, file_size)
            _logger.info(f'Using cached {dst}')
            return dst
        except WeightsIntegrityError as e:
            _logger.warning(f'{e} Deleting the cached copy.')
            dst.unlink()
    if _offline():
        raise WeightsDownloadError(
            f'Offline mode (HF_HUB_OFFLINE=1) and {url} is not in the cache ({dst}). Run once online, or '
            + _how_to_load_file())
    dst.parent.mkdir(parents=True, exist_ok=True)
    _logger.info(f'Downloading {url} to {dst}')
    expected_size = file_size if file_size is not None else _content_length(url)
    partial = dst.with_name(f'.{dst.name}.{os.getpid()}.download')
    try:
        torch.hub.download_url_to_file(url, str(partial), progress=progress)
        if expected_size is not None and partial.stat().st_size != expected_size:
            raise WeightsIntegrityError(
                f'The download of {url} was cut short ({partial.stat().st_size} of {expected_size} bytes); '
                'nothing was saved. Try again, or ' + _how_to_load_file())
        try:
            verify_file(partial, sha256)
        except WeightsIntegrityError as e:
            raise WeightsIntegrityError(
                f'{e} The download was deleted: {url} serves a different file than the one expected; check the '
                'URL and sha256, or ' + _how_to_load_file()) from None
        os.replace(partial, dst)  # only a verified file ever gets the cache name
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else (getattr(e, 'reason', None) or e)
        raise WeightsDownloadError(f'Could not download {url} ({reason}). ' + _how_to_load_file()) from e
    finally:
        partial.unlink(missing_ok=True)
    return dst


def _content_length(url: str) -> Optional[int]:
    """The size a server announces for ``url`` (HEAD request), to detect a download cut short."""
    try:
        req = urllib.request.Request(url, method='HEAD', headers={'User-Agent': 'torch.hub'})
        with urllib.request.urlopen(req, timeout=30) as r:
            length = r.headers.get('Content-Length')
        return int(length) if length else None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None  # the GET that follows reports real failures


def _remove_cached_hub_file(path: Path) -> None:
    """Delete a Hub cache entry: the snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def download_from_hub(
        hf_hub_id: str,
        filenames: Union[str, Sequence[str]] = HUB_FILENAMES,
        sha256: Optional[str] = None,
        file_size: Optional[int] = None,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Fetch the first of ``filenames`` that exists in Hub repo ``org/name[@revision]``.

    Uses ``huggingface_hub.hf_hub_download`` (its cache, progress bar, token and ``HF_HUB_OFFLINE``
    handling); a file failing the sha256/size check is removed from the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = hf_hub_id.partition('@')
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    where = f'{constants.ENDPOINT}/{repo_id}' + (f' (revision {revision})' if revision else '')
    path, missing = None, []
    for name in names:
        try:
            path = Path(hf_hub_download(repo_id, name, revision=revision or None, cache_dir=cache_dir))
            break
        except LocalEntryNotFoundError as e:
            if _offline():
                raise WeightsDownloadError(
                    f'Offline mode (HF_HUB_OFFLINE=1) and {name} of {where} is not in the Hub cache '
                    f'({cache_dir or constants.HF_HUB_CACHE}). Run once online, or ' + _how_to_load_file()) from e
            raise WeightsDownloadError(
                f'Could not reach the Hugging Face Hub for {name} of {where} and it is not cached ({e}). '
                'Check your connection or HF_ENDPOINT, or ' + _how_to_load_file()) from e
        except GatedRepoError as e:
            raise WeightsDownloadError(
                f'{where} is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN).') from e
        except RepositoryNotFoundError as e:
            raise WeightsDownloadError(
                f'{where} was not found, or it is private and no valid token was given '
                '(`hf auth login` or HF_TOKEN).') from e
        except RevisionNotFoundError as e:
            raise WeightsDownloadError(f'{where}: revision {revision!r} does not exist.') from e
        except EntryNotFoundError:
            missing.append(name)
        except OSError as e:  # HfHubHTTPError and other transport errors
            raise WeightsDownloadError(f'Could not download {name} from {where} ({e}). ' + _how_to_load_file()) from e
    if path is None:
        raise WeightsDownloadError(f'{where} has none of the weight files {missing}. Name the file with '
                                   'pretrained_cfg_overlay=dict(hf_hub_id=..., hf_hub_filename=...).')
    try:
        verify_file(path, sha256, file_size)
    except WeightsIntegrityError:
        _remove_cached_hub_file(path)
        raise
    return path


def _find_in_dir(folder: Path) -> Path:
    """The weights file of a ``local-dir:`` folder, in timm's order of preference."""
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder of weights (expected model.safetensors and config.json).')
    for name in HUB_FILENAMES + ('pytorch_model.pth', 'model.pth'):
        if (folder / name).is_file():
            return folder / name
    for ext in (_SAFETENSORS_EXT, '.pth', '.pth.tar', '.bin'):
        found = sorted(folder.glob(f'*{ext}'))
        if found:
            return found[0]
    raise FileNotFoundError(f'No weights file (.safetensors, .pth, .pth.tar, .bin) in {folder}.')


def fetch_weights(
        cfg: Any,
        sha256: Optional[str] = None,
        file_size: Optional[int] = None,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """The local path of the weights a resolved timm ``PretrainedCfg`` points at, fetched if remote.

    Priority follows timm: ``local-dir``/``hf-hub`` sources, then ``file``, then ``hf_hub_id``, then ``url``.
    The expected sha256/size come from the arguments or, for remote sources, from the registry.
    """
    if cfg.source == 'local-dir':
        path = _find_in_dir(Path(cfg.file))
    elif cfg.file and cfg.source != 'hf-hub':
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f'Weights file {path} does not exist.')
    elif cfg.hf_hub_id:
        entry = find_entry(hf_hub_id=cfg.hf_hub_id, filename=cfg.hf_hub_filename)
        if entry and not sha256:
            sha256, file_size = entry.sha256, entry.file_size
        filenames = cfg.hf_hub_filename or (entry.source['filename'] if entry else HUB_FILENAMES)
        return download_from_hub(cfg.hf_hub_id, filenames, sha256, file_size, cache_dir)
    elif cfg.url:
        entry = find_entry(url=cfg.url)
        if entry and not sha256:
            sha256, file_size = entry.sha256, entry.file_size
        return download_url(cfg.url, sha256, file_size, cache_dir)
    else:
        raise NoPretrainedWeightsError(no_weights_message(cfg.architecture or 'this model', cfg.tag))
    verify_file(path, sha256, file_size)
    return path


# ---------------------------------------------------------------------------------------------
# the pretrained path of timm.create_model

def no_weights_message(model: str, tag: Optional[str] = None) -> str:
    """Why ``pretrained=True`` failed and the three ways to give weights."""
    tags = sorted(e.name for e in registered_weights() if e.model == model)
    have = f'Registered weights for {model}: {", ".join(tags)}.' if tags else (
        f'None are registered for {model} in weights/registry.json: the EPSANet authors never released '
        'ImageNet weights, and this project lists only weights that exist.')
    return (
        f'No pretrained weights for {model}' + (f' (tag "{tag}")' if tag else '') + f'. {have}\n'
        'Load weights you have in one of three ways:\n'
        f'  file: timm.create_model("{model}", pretrained=True, '
        'pretrained_cfg_overlay=dict(file="path/to/weights.safetensors"))\n'
        f'  URL:  timm.create_model("{model}", pretrained=True, '
        'pretrained_cfg_overlay=dict(url="https://host/weights.safetensors", sha256="<sha256>"))\n'
        '  Hub:  timm.create_model("hf-hub:<org>/<repo>", pretrained=True)\n'
        'An authors\' checkpoint (checkpoint.pth.tar) loads as a file; `epsanet convert` turns it into a '
        'Hub-ready folder. Use pretrained=False for random initialisation.')


def _checkpoint_shape(state_dict: Dict[str, torch.Tensor], cfg: Any) -> Dict[str, Any]:
    """num_classes / input_size overlay read from the checkpoint's classifier and stem conv."""
    out = {}
    fc = state_dict.get(f'{cfg.classifier or "fc"}.weight')
    if fc is not None and fc.ndim == 2:
        out['num_classes'] = int(fc.shape[0])
    stem = state_dict.get(f'{cfg.first_conv or "conv1"}.weight')
    if stem is not None and stem.ndim == 4 and cfg.input_size:
        out['input_size'] = (int(stem.shape[1]), *tuple(cfg.input_size)[1:])
    return out


def build_pretrained(build_fn: Callable[..., torch.nn.Module], variant: str, **kwargs) -> torch.nn.Module:
    """Fetch, verify and read the weights for ``variant``, then build with ``build_fn(True, **kwargs)``.

    ``build_fn`` is ``build_model_with_cfg`` bound to the model class and filter. Extra overlay keys
    ``sha256`` and ``file_size`` give the expected hash/size of a file or URL. The weights reach timm as
    a state dict with the checkpoint's class count and input channels, so timm re-initialises the
    classifier only when ``num_classes`` differs, and adapts the stem conv to ``in_chans`` its own way.
    """
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    sha256, file_size = overlay.pop('sha256', None), overlay.pop('file_size', None)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=overlay)
    if cfg.state_dict is not None:  # an in-memory state dict given by the caller
        state_dict = cfg.state_dict
    elif not cfg.has_weights:
        raise NoPretrainedWeightsError(no_weights_message(variant, cfg.tag))
    else:
        path = fetch_weights(cfg, sha256, file_size, cache_dir=kwargs.get('cache_dir'))
        state_dict = read_state_dict(path)
    loaded = {**_checkpoint_shape(state_dict, cfg), **overlay}  # explicit overlay values win
    model = build_fn(True, pretrained_cfg_overlay=dict(loaded, state_dict=state_dict, source=None), **kwargs)
    # keep the model's pretrained_cfg describing where the weights came from, without the tensors
    model.pretrained_cfg.pop('state_dict', None)
    if cfg.source:
        model.pretrained_cfg['source'] = cfg.source
    return model


WeightsSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def weights_overlay(weights: WeightsSource) -> Dict[str, Any]:
    """The timm ``pretrained_cfg_overlay`` that points a model's weight source at ``weights``.

    The one place that turns a user's weights argument into a timm source; ``create_pretrained``,
    detection/segmentation backbones and ``epsanet train --initial-checkpoint`` all use it.
    ``weights`` is a local file (.safetensors, .pth, .pth.tar, .bin), a ``local-dir:`` folder, an
    ``http(s)://`` or ``file://`` URL, an ``hf-hub:org/name[@revision]`` Hub id, or an in-memory state
    dict. Every other weight source of the model's default cfg is cleared, so the one given here is
    the one timm loads.

    Raises:
        ValueError: a malformed Hub id.
        FileNotFoundError: anything else that is not an existing file or folder.
    """
    cleared = dict(url=None, file=None, state_dict=None, hf_hub_id=None, hf_hub_filename=None, source=None)
    if isinstance(weights, Mapping):
        return {**cleared, 'state_dict': dict(weights)}
    src = os.fspath(weights)
    if src.startswith('hf-hub:'):
        hub_id = src[len('hf-hub:'):]
        if hub_id.partition('@')[0].count('/') != 1:
            raise ValueError(f'Hub weights must be given as "hf-hub:organization/name[@revision]", got {src!r}.')
        return {**cleared, 'hf_hub_id': hub_id, 'source': 'hf-hub'}
    if urlparse(src).scheme in ('http', 'https', 'file'):
        return {**cleared, 'url': src}
    if src.startswith('local-dir:') or os.path.isdir(src):
        folder = src[len('local-dir:'):] if src.startswith('local-dir:') else src
        return {**cleared, 'file': os.path.abspath(folder), 'source': 'local-dir'}
    if os.path.isfile(src):
        return {**cleared, 'file': os.path.abspath(src)}
    raise FileNotFoundError(
        f'Weights {src!r} are neither an existing file or folder, an http(s):// URL nor an '
        '"hf-hub:organization/name" Hub id. Pass one of these.')


def create_pretrained(
        model_name: str,
        weights: Optional[WeightsSource] = None,
        sha256: Optional[str] = None,
        **kwargs,
) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=True)`` with weights from a file, URL or Hub id.

    Args:
        model_name: ``epsanet50``, a registry tag (``epsanet50.in1k``) or ``hf-hub:org/repo``.
        weights: None (the registered weights) or any source :func:`weights_overlay` takes.
        sha256: expected sha256 of the file or URL.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``, ``cache_dir``, ...).
    """
    import timm
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    import epsanet  # noqa: F401  (registers the models)

    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if weights is not None:
        overlay.update(weights_overlay(weights))
    if sha256:
        overlay['sha256'] = sha256
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError) as e:  # timm fetching an hf-hub: model's config.json
        raise WeightsDownloadError(
            f'Could not get the config.json of {model_name} from the Hugging Face Hub ({e}). Check the repo id, '
            'your connection and token (`hf auth login`), or ' + _how_to_load_file()) from e
