"""Training memory: the stem's activations recomputed in the backward pass instead of stored.

The stem (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool) works at 1/2 resolution with 64 channels, so
autograd keeps three large maps for it (the conv output, the ReLU output and the pool's int64 indices):
about a twelfth of a ResNet-50-style network's training memory at 224 px. :func:`recompute_stem` runs
the stem under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), which keeps only the input
image and runs the stem again during the backward pass.

The stem's modules stay where they are (``conv1``, ``bn1``, ``act1``, ``maxpool``: same state-dict keys)
and are called as modules, so hooks fire on them in the forward pass, and again for the modules that the
recomputation runs (autograd stops it as soon as it has what the backward pass needs).
The recomputation does not update the BatchNorm running statistics a second time: the outputs,
gradients and statistics are those of the plain model.

It works on timm's ``ResNet`` (every EPSANet): the model's class becomes a subclass of its class that
overrides ``forward_features`` only. :func:`restore_stem` undoes it.
"""
from typing import Dict, List

import torch
from timm.models import ResNet
from timm.models._manipulate import checkpoint_seq
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ['recompute_stem', 'restore_stem', 'StemRecomputingResNet']


def _buffers_of(modules: List[nn.Module]) -> Dict[str, torch.Tensor]:
    return {f'{i}.{name}': buf for i, m in enumerate(modules) for name, buf in m.named_buffers(recurse=True)}


class StemRecomputingResNet(ResNet):
    """A timm ``ResNet`` whose stem is recomputed in the backward pass (see the module docstring).

    Not built directly: :func:`recompute_stem` turns an existing model into one.
    """

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def _checkpointed_stem(self, x: torch.Tensor) -> torch.Tensor:
        modules = [self.conv1, self.bn1, self.act1, self.maxpool]
        calls = []

        def run(inp: torch.Tensor) -> torch.Tensor:
            if not calls:  # the forward pass
                calls.append(1)
                return self._stem(inp)
            # the recomputation in the backward pass: the BatchNorm statistics were updated already
            saved = {k: b.clone() for k, b in _buffers_of(modules).items()}
            try:
                return self._stem(inp)
            finally:
                with torch.no_grad():
                    for k, b in _buffers_of(modules).items():
                        b.copy_(saved[k])

        return checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = self._checkpointed_stem(x)
        else:
            x = self._stem(x)
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(layers, x, flatten=True)
        for layer in layers:
            x = layer(x)
        return x


_SUBCLASSES: Dict[type, type] = {StemRecomputingResNet: StemRecomputingResNet, ResNet: StemRecomputingResNet}


def _subclass_of(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f'StemRecomputing{cls.__name__}', (StemRecomputingResNet, cls), {})
    return _SUBCLASSES[cls]


def recompute_stem(model: nn.Module) -> bool:
    """Recompute ``model``'s stem in the backward pass (in place); False (nothing changed) when the model is
    not a timm ``ResNet`` (e.g. a ``features_only`` wrapper)."""
    if not isinstance(model, ResNet):
        return False
    model.__class__ = _subclass_of(type(model))
    return True


def restore_stem(model: nn.Module) -> nn.Module:
    """Undo :func:`recompute_stem`: the model's original class again."""
    if isinstance(model, StemRecomputingResNet):
        bases = [b for b in type(model).__mro__[1:] if not issubclass(b, StemRecomputingResNet)]
        model.__class__ = bases[0]
    return model
