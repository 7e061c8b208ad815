"""Training memory saver for the ResNet stem: conv, BatchNorm, activation, max pool.

Autograd keeps four feature maps of the stem at the input resolution / 2 (the conv output for
the BatchNorm, the activation's output, the max-pool indices as int64): about 120 MiB at batch
16 and 224 px, the largest maps of the network. :func:`recomputed_stem` keeps only the stem's
input (which the conv keeps anyway) and runs the stem forward a second time in the backward
pass. That costs a forward, partly paid back by applying the ReLU's gradient to the 4x smaller
pooled gradient instead of the full-size map. Measured on a 2-core CPU at batch 8 and 224 px
(interleaved A/B runs): the stem's forward + backward takes about 10-15 ms longer, of a ~1.5 s
EPSANet-50 training step; whole training steps showed no difference beyond the noise.

The BatchNorm's running statistics are updated once, in the forward pass; the recomputation uses
the same batch statistics (or, for a BatchNorm in eval mode, the same running statistics)
without touching the buffers, so outputs, gradients and buffers are those of the plain stem.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn

from .branch_conv import is_channels_last

__all__ = ['recomputed_stem', 'supports_recomputed_stem']


def supports_recomputed_stem(conv: nn.Module, bn: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether :func:`recomputed_stem` can run these modules: a plain ``Conv2d``, a plain
    ``BatchNorm2d`` (not a subclass such as timm's ``BatchNormAct2d``, whose forward does more),
    a ``ReLU`` (or ``Identity``) and a ``MaxPool2d`` returning no indices."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == 'zeros' and type(bn) is nn.BatchNorm2d
            and type(act) in (nn.ReLU, nn.Identity) and type(pool) is nn.MaxPool2d and not pool.return_indices)


def recomputed_stem(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module,
                    pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(act(bn(conv(x))))`` keeping only ``x`` for the backward pass (see the module doc).

    The forward pass calls the modules themselves. Check :func:`supports_recomputed_stem` first;
    not for autocast (the recomputation would not see it). With ``create_graph=True`` the backward
    pass differentiates a recomputed forward, so double backward works too.
    """
    return _RecomputedStem.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, (conv, bn, act, pool))


class _RecomputedStem(torch.autograd.Function):
    """Forward: the modules. Backward: conv, BatchNorm, activation and max pool again (saving the
    pool's indices), then their gradients with the kernels autograd would use."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                modules: Tuple[nn.Module, nn.Module, nn.Module, nn.Module]) -> torch.Tensor:
        conv, bn, act, pool = modules
        ctx.modules = modules
        ctx.batch_stats = bn.training or bn.running_mean is None
        ctx.save_for_backward(x, conv_weight, conv_bias, bn_weight, bn_bias)
        x = _in_format_of_weight(x, conv_weight)
        return pool(act(bn(conv._conv_forward(x, conv_weight, conv_bias))))  # bn updates its running stats here

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        conv, bn, act, pool = ctx.modules
        x, conv_weight, conv_bias, bn_weight, bn_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that autograd can differentiate again
            return _differentiable_backward(ctx, grad)
        x = _in_format_of_weight(x, conv_weight)
        batch_stats = ctx.batch_stats
        running_mean, running_var = (None, None) if batch_stats else (bn.running_mean, bn.running_var)
        c = conv._conv_forward(x, conv_weight, conv_bias)
        # the kernels autograd would run, so the recomputed maps equal the forward's bit for bit
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            c, bn_weight, bn_bias, running_mean, running_var, batch_stats, 0., bn.eps)
        y = act(y)
        pooled, indices = F.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                       ceil_mode=pool.ceil_mode, return_indices=True)
        if isinstance(act, nn.ReLU):
            # ReLU's gradient, applied before the max pool's: a window's maximum is > 0 exactly where
            # the position it came from passes the ReLU (4x fewer values than after the pool)
            grad = torch.where(pooled > 0, grad, 0)  # (masked_fill would return NCHW for channels_last)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, y, to_2tuple(pool.kernel_size), to_2tuple(pool.stride), to_2tuple(pool.padding),
            to_2tuple(pool.dilation), pool.ceil_mode, indices)
        del y, pooled, indices
        grad_c, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad, c, bn_weight, running_mean, running_var, mean, invstd, batch_stats, bn.eps,
            [True, ctx.needs_input_grad[3], ctx.needs_input_grad[4]])
        del grad, c
        grad_x, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
            grad_c, x, conv_weight, None if conv_bias is None else list(conv_bias.shape), conv.stride, conv.padding,
            conv.dilation, False, [0, 0], conv.groups, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_conv_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias, None


def _differentiable_backward(ctx, grad: torch.Tensor):
    """The backward pass as autograd of a recomputed forward (same normalisation, buffers untouched)."""
    conv, bn, act, pool = ctx.modules
    inputs = ctx.saved_tensors  # with their autograd history: the result is differentiable in them
    x, conv_weight, conv_bias, bn_weight, bn_bias = inputs
    running = (None, None) if ctx.batch_stats else (bn.running_mean, bn.running_var)
    c = conv._conv_forward(x, conv_weight, conv_bias)
    out = pool(act(F.batch_norm(c, *running, bn_weight, bn_bias, ctx.batch_stats, 0., bn.eps)))
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i]]
    grads = dict(zip(wanted, torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=True)))
    return (*(grads.get(i) for i in range(len(inputs))), None)


def _in_format_of_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` channels_last when the conv weight is: the conv runs twice, and in one interleaved A/B at
    batch 8 the stem's forward and backward took 57 instead of 64 ms so."""
    return x.contiguous(memory_format=torch.channels_last) if is_channels_last(weight) else x
