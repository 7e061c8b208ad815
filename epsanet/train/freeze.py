"""Freezing parts of a model (timm's ``freeze``) and exporting a standard state dict afterwards."""
from typing import Dict, Sequence

import torch
from timm.utils import freeze as timm_freeze

from ..app.errors import ConfigError

__all__ = ['freeze_modules', 'export_state_dict']


def freeze_modules(model: torch.nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Freeze the named top-level modules (``"backbone"`` = everything but the classifier).

    Parameters stop training and BatchNorm layers become ``FrozenBatchNorm2d`` (fixed statistics),
    through timm's ``freeze``. Returns the ``num_batches_tracked`` buffers that FrozenBatchNorm2d
    drops, for :func:`export_state_dict`.
    """
    if not names:
        return {}
    children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    head = model.pretrained_cfg.get('classifier', 'fc') if hasattr(model, 'pretrained_cfg') else 'fc'
    wanted = []
    for name in names:
        if name == 'backbone':
            wanted.extend(c for c in children if c != head)
        elif name in children:
            wanted.append(name)
        else:
            raise ConfigError(f'--freeze {name}: no such module. Choose from backbone, {", ".join(children)}.')
    wanted = list(dict.fromkeys(wanted))
    if set(children) <= set(wanted):
        raise ConfigError('--freeze would freeze every parameter, leaving nothing to train.')
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    timm_freeze(model, wanted)
    return saved


def export_state_dict(model: torch.nn.Module, dropped: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with the buffers frozen BatchNorm layers dropped put back: a plain model's layout."""
    state = dict(model.state_dict())
    for k, v in dropped.items():
        state.setdefault(k, v)
    return state
