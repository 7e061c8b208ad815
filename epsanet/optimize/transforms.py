"""The two one-line CPU settings: ``optimize_for_inference(model)`` and ``optimize_for_training(model)``.

The EPSANet that ``timm.create_model`` returns is a plain ``nn.Module`` that runs the same way on every
device. These transforms swap in CPU-specialised modules, which are still modules, still called in the
forward pass (hooks fire on them), and compute the same numbers within float rounding:

* training only: every PSA layer becomes a :class:`~epsanet.optimize.fast_psa.FastPSA`, which keeps its
  output instead of its branch features for the backward pass (one feature map less per block);
* inference only: every conv -> BatchNorm pair is folded into one conv (:mod:`epsanet.optimize.fold_bn`);
* inference only: every PSA branch conv becomes a :class:`~epsanet.optimize.tuned_conv.TunedConv2d` (same
  weight tensor), which runs in the form measured fastest on this CPU for each input shape it meets;
* training only: the stem is recomputed in the backward pass instead of stored
  (:mod:`epsanet.optimize.recompute_stem`; ``recompute_stem=False`` keeps it);
* the weights are stored channels_last (``channels_last=True``): the first conv then returns
  channels_last maps even for NCHW input, and the whole network runs in that format.

On a model whose parameters are not on the CPU they change nothing (inference: only ``model.eval()``)
and say so in one log line. Hooks registered before a transform stay on the replaced modules: register
them afterwards. TorchScript, ``torch.fx``, ``torch.export`` and ONNX export want the plain model; under
``torch.compile``, autocast or tracing the PSA layers run as plain ones.
"""
import logging
from typing import Sequence

import torch
from torch import nn

from ..layers.psa import PyramidSqueezeAttention
from .fast_psa import FastPSA
from .fold_bn import fold_batchnorm
from .recompute_stem import recompute_stem as _recompute_stem
from .tuned_conv import TunedConv2d

__all__ = ['MECHANISMS', 'optimize_for_inference', 'optimize_for_training', 'is_optimized']

_logger = logging.getLogger(__name__)


def _on_cpu(model: nn.Module, what: str) -> bool:
    devices = {p.device.type for p in model.parameters()}
    if devices and devices != {'cpu'}:
        _logger.info(f'{what}: the model is on {", ".join(sorted(devices))}, not the CPU; nothing changed '
                     '(these transforms are CPU-specific).')
        return False
    return True


# What ``without`` may leave off (for ``epsanet benchmark --ablate``, which measures what each is worth)
MECHANISMS = ('fast_psa', 'fold_batchnorm', 'tuned_convs', 'recompute_stem')


def _check_without(without: Sequence[str]) -> None:
    bad = [w for w in without if w not in MECHANISMS]
    if bad:
        raise ValueError(f'Unknown mechanism {bad}: choose from {", ".join(MECHANISMS)}.')


def _swap_psa_layers(model: nn.Module, without: Sequence[str] = ()) -> int:
    """Replace every PSA layer by a FastPSA (its own branch convs and SE module); returns the count."""
    from ..models.epsanet import PSABottleneck

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PyramidSqueezeAttention):
                fast = child
                if 'fast_psa' not in without:
                    fast = child if isinstance(child, FastPSA) else FastPSA.from_psa(child)
                    # the output is kept only where the next layer (bn2) keeps it anyway and nothing changes it
                    fast.save_output_for_backward = isinstance(parent, PSABottleneck)
                setattr(parent, name, fast)
                count += 1
    return count


def _tune_branch_convs(model: nn.Module) -> None:
    for psa in [m for m in model.modules() if isinstance(m, PyramidSqueezeAttention)]:
        for i, conv in enumerate(psa.convs):
            if TunedConv2d.supports(conv):
                psa.convs[i] = TunedConv2d.from_conv(conv)


def optimize_for_inference(model: nn.Module, channels_last: bool = True, without: Sequence[str] = ()) -> nn.Module:
    """The one-line CPU inference setting: ``model = epsanet.optimize_for_inference(model)``.

    Puts the model in eval mode, folds BatchNorm into the preceding convs, lets each PSA branch conv run in
    the form measured fastest on this CPU (the first call of each input shape measures) and, with
    ``channels_last``, stores the weights channels_last (inputs may stay NCHW). Numerically the same
    network (float rounding aside), but it can no longer be trained: re-create the model to fine-tune.
    Works in place and returns the model. ``without`` names mechanisms (:data:`MECHANISMS`) to leave
    off, for measuring what each is worth. See :mod:`epsanet.optimize.transforms`.
    """
    _check_without(without)
    model.eval()
    if not _on_cpu(model, 'optimize_for_inference'):
        return model
    if 'fold_batchnorm' not in without:
        fold_batchnorm(model)
    if 'tuned_convs' not in without:
        _tune_branch_convs(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def optimize_for_training(model: nn.Module, channels_last: bool = True, recompute_stem: bool = True,
                          without: Sequence[str] = ()) -> nn.Module:
    """The one-line CPU training setting: ``model = epsanet.optimize_for_training(model)``.

    Lets each PSA layer keep its output
    instead of its branch features for the backward pass, with ``recompute_stem`` runs the stem again in
    the backward pass instead of storing its activations (hooks on the stem's modules then fire again
    during the backward pass) and, with ``channels_last``, stores the weights channels_last. Every
    state-dict key and shape stays as it was, so checkpoints move freely between the plain and the
    transformed model; outputs, gradients and BatchNorm statistics are the plain model's within float
    rounding. Works in place (keeping train/eval
    mode) and returns the model. ``without`` names mechanisms (:data:`MECHANISMS`) to leave off.
    """
    _check_without(without)
    if not _on_cpu(model, 'optimize_for_training'):
        return model
    _swap_psa_layers(model, without=without)
    if recompute_stem and 'recompute_stem' not in without:
        _recompute_stem(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether a CPU transform has been applied to ``model`` (it holds FastPSA layers or tuned convs)."""
    return any(isinstance(m, (FastPSA, TunedConv2d)) for m in model.modules())
