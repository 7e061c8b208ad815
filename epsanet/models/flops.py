"""Model cost under the EPSANet paper's counting rule."""
import torch
from torch import nn

__all__ = ['count_gflops']


@torch.no_grad()
def count_gflops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """GFLOPs as the EPSANet paper counts them, at ``img_size`` x ``img_size``, batch 1.

    Multiply-accumulates of every conv and linear layer plus two operations per BatchNorm output
    element; activations, pooling and the PSA softmax are free. This rule gives the paper's 3.62 G
    for EPSANet-50. Works on a ``device='meta'`` model (shapes only, no compute).
    """
    total = 0

    def conv_macs(conv: nn.Conv2d, out_numel: int) -> int:
        return out_numel * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]

    def hook(module, _inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += conv_macs(module, out.numel())
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            total += 2 * out.numel()

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
    return total / 1e9
