"""Model cost under the EPSANet paper's counting rule, and the multiply-adds of chosen convs."""
from typing import Callable

import torch
from torch import nn

__all__ = ['count_gflops', 'count_conv_macs']


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    return out.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]


@torch.no_grad()
def _total(model: nn.Module, cost: Callable[[nn.Module, torch.Tensor], int], img_size: int, in_chans: int) -> int:
    """Sum of ``cost(module, output)`` over every module call of one eval-mode forward pass at batch 1."""
    total = 0

    def hook(module, _inputs, out):
        nonlocal total
        total += cost(module, out)

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def count_gflops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """GFLOPs as the EPSANet paper counts them, at ``img_size`` x ``img_size``, batch 1.

    Multiply-accumulates of every conv and linear layer plus two operations per BatchNorm output
    element; activations, pooling and the PSA softmax are free. This rule gives the paper's 3.62 G
    for EPSANet-50. Works on a ``device='meta'`` model (shapes only, no compute).
    """
    def cost(module: nn.Module, out: torch.Tensor) -> int:
        if isinstance(module, nn.Conv2d):
            return _conv_macs(module, out)
        if isinstance(module, nn.Linear):
            return out.numel() * module.in_features
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return 2 * out.numel()
        return 0

    return _total(model, cost, img_size, in_chans) / 1e9


def count_conv_macs(model: nn.Module, select: Callable[[nn.Conv2d], bool], img_size: int = 224,
                    in_chans: int = 3) -> int:
    """Multiply-adds of the ``nn.Conv2d`` modules that ``select`` picks, for one image (``meta`` models work)."""
    return _total(model, lambda m, out: _conv_macs(m, out) if isinstance(m, nn.Conv2d) and select(m) else 0,
                  img_size, in_chans)
