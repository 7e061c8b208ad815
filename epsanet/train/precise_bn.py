"""BatchNorm statistics recomputed for the current weights before validation ("precise BN").

BatchNorm evaluates with running averages (momentum 0.1: about the last 10 training batches). On a
small data set an epoch is only a handful of batches, and early in training the weights move so
fast that the averages describe weights from several steps ago: the evaluated network is
mis-normalised and predicts one class for everything, so validation sits at chance for epochs
while the training loss falls (measured: see the README's small-data section). Recomputing the
statistics with the current weights over the training images fixes the evaluated model, and the
saved weights carry the recomputed statistics.
"""
from typing import Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['recalibrate_bn']


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader: Iterable, device: torch.device, autocast: Callable = None,
                   channels_last: bool = False, distributed: bool = False) -> int:
    """Reset every tracked BatchNorm's running statistics and recompute them as the plain average over
    the batches of ``loader`` (training mode, no gradients). Under DDP the statistics are averaged over
    processes afterwards. Returns the number of batches used (0: the model has no BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    batches = 0
    try:
        for images, _ in loader:
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if autocast is not None:
                with autocast():
                    model(images)
            else:
                model(images)
            batches += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if distributed and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf.div_(world)
    return batches
