"""The ``epsanet.*`` metadata a safetensors weights file carries (model name, classes, eval preprocessing).

``epsanet train`` records them with every weights file it writes (:func:`encode_metadata`), so that
validation, prediction, conversion and the Hub folder need no other flags; :func:`read_weights_metadata`
reads them back.
"""
import json
import os
from typing import Any, Dict, Mapping, Optional, Union

from safetensors import SafetensorError, safe_open

from .loading import WeightsError, read_state_dict

__all__ = ['encode_metadata', 'read_weights_metadata', 'stored_num_classes']

_META_PREFIX = 'epsanet.'


def encode_metadata(metadata: Mapping[str, Any]) -> Dict[str, str]:
    """safetensors' string-to-string header: ``format`` plus each value as JSON under ``epsanet.<key>``."""
    out = {'format': 'pt'}
    out.update({_META_PREFIX + k: json.dumps(v) for k, v in metadata.items()})
    return out


def read_weights_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``epsanet.*`` metadata of a safetensors file (empty when it has none)."""
    try:
        with safe_open(str(path), framework='pt') as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f'cannot read {path} as safetensors ({e}).') from e
    out = {}
    for k, v in raw.items():
        if k.startswith(_META_PREFIX):
            try:
                out[k[len(_META_PREFIX):]] = json.loads(v)
            except json.JSONDecodeError:
                out[k[len(_META_PREFIX):]] = v
    return out


def stored_num_classes(path: Union[str, os.PathLike], classifier: str = 'fc') -> Optional[int]:
    """Number of classes of the classifier stored in a weights file (``None`` when it has none); a
    safetensors file is read from its header alone."""
    key = f'{classifier}.weight'
    if str(path).endswith('.safetensors'):
        try:
            with safe_open(str(path), framework='pt') as f:
                return f.get_slice(key).get_shape()[0] if key in f.keys() else None
        except (SafetensorError, OSError) as e:
            raise WeightsError(f'cannot read {path} as safetensors ({e}).') from e
    state_dict = read_state_dict(path)
    return state_dict[key].shape[0] if key in state_dict else None
