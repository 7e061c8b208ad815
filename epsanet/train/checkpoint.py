"""Checkpoints: model weights as safetensors plus a training-state file for ``--resume``.

A run directory holds

* ``last.safetensors``: the weights after the last finished epoch, loadable by timm with
  ``timm.create_model(name, pretrained=True, num_classes=n, pretrained_cfg_overlay=dict(file=path, num_classes=n))``;
* ``last.state.pth``: everything ``--resume`` needs, in one file: weights, optimizer, scheduler,
  loss scaler, EMA weights, the position (epoch and step), every random generator's state, the
  metrics history. Written at epoch ends, every ``--checkpoint-interval`` steps and when a signal
  stops the run; only tensors and plain Python values, read back with ``torch.load(weights_only=True)``;
* ``best.safetensors``: the weights with the best validation top-1 so far.

Every file is written to a temporary file in the same folder and renamed over the old one, so an
interrupted write (full disk, power loss, SIGKILL) leaves the previous checkpoint intact; the
state file is written last, so everything an epoch writes before it is redone on resume.
"""
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from safetensors.torch import save

from .. import files
from ..app.errors import CheckpointError
from ..weights.metadata import encode_metadata
from .interrupt import pause_point

__all__ = [
    'atomic_write', 'save_weights', 'save_state', 'load_state', 'resolve_resume',
    'latest_state', 'remove_stale_temporaries', 'WEIGHTS_SUFFIX', 'STATE_SUFFIX',
]

_logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = '.safetensors'
STATE_SUFFIX = '.state.pth'

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """:func:`epsanet.files.atomic_write` for a training run's files: a failed write becomes a
    :class:`CheckpointError` that also says how to resume."""
    try:
        files.atomic_write(path, write)
    except files.FileWriteError as e:
        raise CheckpointError(f'{e} Resume from the last checkpoint with --resume.') from e


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_weights(path: PathLike, state_dict: Dict[str, torch.Tensor],
                 metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write ``state_dict`` as safetensors with ``metadata`` (:func:`epsanet.weights.metadata.encode_metadata`)."""
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}
    meta = encode_metadata(metadata or {})
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def _write_bytes(path: str, data: bytes) -> None:
    """Written by Python, so a full disk is an ``OSError`` (ENOSPC), not safetensors' own error type."""
    with open(path, 'wb') as f:
        f.write(data)


def save_state(path: PathLike, state: Dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:  # through a Python file: a full disk is an OSError, not a RuntimeError
            torch.save(state, f)
        pause_point('state-write')  # test hook: a signal or SIGKILL between the write and the rename

    atomic_write(path, write)


def load_state(path: PathLike) -> Dict[str, Any]:
    """Read a training-state file without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f'training state {path} does not exist.') from e
    except Exception as e:  # torch raises pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f'cannot read training state {path} ({type(e).__name__}: {e}). It is corrupt or not '
                              'a file written by "epsanet train".') from e
    if not isinstance(state, dict) or 'epoch' not in state or 'optimizer' not in state:
        raise CheckpointError(f'{path} is not a training state written by "epsanet train" (no epoch/optimizer).')
    return state


def resolve_resume(path: PathLike) -> Dict[str, Path]:
    """Accept a run folder, ``<tag>.state.pth`` or ``<tag>.safetensors``; return both file paths.

    The state file must exist; the weights file is only read for states written before the state held
    the weights (format 1).
    """
    path = Path(path)
    if path.is_dir():
        path = path / f'last{STATE_SUFFIX}'
    name = path.name
    if name.endswith(STATE_SUFFIX):
        stem = name[:-len(STATE_SUFFIX)]
    elif name.endswith(WEIGHTS_SUFFIX):
        stem = name[:-len(WEIGHTS_SUFFIX)]
    else:
        raise CheckpointError(f'--resume expects a run folder, a *{STATE_SUFFIX} file or "auto", got {path}.')
    files = dict(state=path.with_name(stem + STATE_SUFFIX), weights=path.with_name(stem + WEIGHTS_SUFFIX))
    if not files['state'].is_file():
        raise CheckpointError(f'cannot resume: {files["state"]} does not exist (it holds what a resume needs; '
                              '--resume auto starts a new run when a folder has none).')
    return files


def latest_state(folder: PathLike) -> Optional[Path]:
    """The newest readable ``*.state.pth`` in ``folder`` (``None`` when there is none); unreadable ones are
    skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob(f'*{STATE_SUFFIX}') if p.is_file() and not p.name.startswith('.')),
                        key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in candidates:
        try:
            load_state(path)
        except CheckpointError as e:
            _logger.warning('--resume auto: skipping %s: %s', path, e)
            continue
        return path
    return None


def remove_stale_temporaries(folder: PathLike, names=(f'last{STATE_SUFFIX}', f'last{WEIGHTS_SUFFIX}',
                                                      f'best{WEIGHTS_SUFFIX}')) -> int:
    """Delete the temporary files a killed :func:`atomic_write` of ``names`` left in ``folder``; return how many."""
    removed = 0
    for name in names:
        for tmp in Path(folder).glob(f'.{name}.*.tmp'):
            _remove(str(tmp))
            removed += 1
    if removed:
        _logger.info('removed %d unfinished temporary files of an interrupted checkpoint write in %s.', removed,
                     folder)
    return removed
