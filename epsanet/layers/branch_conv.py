"""The PSA branch convs in their fastest form on oneDNN (x86 CPU), with the same numbers.

A PSA branch is a grouped conv with a large kernel and few channels per group. oneDNN runs such
convs far below its speed on dense convs, and how far depends on the shape, the memory format
and the pass. Each branch therefore has a *plan*, fixed when the layer is built
(:func:`plan_branch`): the formulation and memory format of its forward pass. When autograd
needs the branch on CPU, :class:`_FastForwardGroupedConv` runs that forward and computes the
gradients with the grouped conv's own backward in channels_last, the backward's fastest form.

Measured per EPSANet-50 branch shape (torch 2.14, oneDNN 3.12, AVX-512, batch 8, 224 px):

* grouped convs with a large kernel (7, 9) and 1-2 output channels per group run 3-10x faster
  as depthwise convs plus a sum over each group's input channels
  (:func:`grouped_conv_as_depthwise`): e.g. the stage-1 7x7 branch (8 inputs, 2 outputs per
  group) 10.8 -> 3.8 ms, the stage-1 9x9 branch (4 inputs, 1 output) 17.5 -> 2.3 ms;
* forward: other grouped convs with fewer than 64 input channels per group are faster in
  NCHW, dense and wider-group convs in channels_last; the 1-output depthwise form is fastest in
  NCHW, the 2-output one in channels_last;
* backward: the grouped conv's backward in channels_last is 1.5-6x faster than in NCHW for
  fewer than 32 input channels per group and close to it elsewhere; it is as fast as the
  backward of the depthwise form for 1 output per group and 1.5-2x faster for 2 or more;
* weight gradient of stride-1 7x7 and 9x9 branches with few channels per group: 1.6-3.8x
  faster by FFT (:mod:`epsanet.layers.fft_weight_grad`).

Other devices keep the caller's memory format and autograd differentiates the formulation
itself (depthwise only for 1 output per group, where its backward is as fast).
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .fft_weight_grad import fft_weight_grad, fft_weight_grad_pays_off

__all__ = [
    'NCHW', 'CHANNELS_LAST', 'plan_branch', 'branch_conv', 'grouped_conv_as_depthwise',
    'to_memory_format', 'in_format_of', 'is_channels_last',
]

# the memory formats a branch can run in
NCHW, CHANNELS_LAST = 0, 1  # (to_memory_format spells them as literals for TorchScript)


def plan_branch(in_per_group: int, out_per_group: int, kernel_size: int) -> Tuple[bool, bool, int]:
    """``(as_depthwise, as_depthwise_autograd, memory_format)`` of one branch conv.

    ``as_depthwise`` and ``memory_format`` are the forward's form on CPU (see the module
    docstring); ``as_depthwise_autograd`` is the form where autograd differentiates the
    formulation itself (other devices, TorchScript).
    """
    large_kernel = in_per_group > 1 and kernel_size >= 7
    as_depthwise = large_kernel and out_per_group <= 2
    as_depthwise_autograd = large_kernel and out_per_group == 1
    if as_depthwise:
        return True, as_depthwise_autograd, NCHW if out_per_group == 1 else CHANNELS_LAST
    return False, as_depthwise_autograd, CHANNELS_LAST if in_per_group >= 64 else NCHW


@torch.fx.wrap
def branch_conv(
        x: torch.Tensor,
        x_fwd: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        in_per_group: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        as_depthwise: bool,
        as_depthwise_autograd: bool,
) -> torch.Tensor:
    """``conv2d(x, weight, groups=groups)`` (same padding) in the branch's planned form.

    ``x_fwd`` is ``x`` in the planned memory format (the caller converts once per layer).
    A leaf for torch.fx: which path runs depends on the grad mode and device at call time.
    TorchScript (scripted or traced) gets the plain formulation: it cannot hold the custom
    autograd function.
    """
    if not torch.jit.is_scripting():  # TorchScript compiles no code under this line
        if torch.is_grad_enabled() and x.device.type == 'cpu' and not torch.jit.is_tracing():
            return _FastForwardGroupedConv.apply(
                x, x_fwd, weight, groups, in_per_group, out_chs, kernel_size, stride, dilation, as_depthwise)
    return _conv_forward(
        x_fwd, weight, groups, in_per_group, out_chs, kernel_size, stride, dilation,
        as_depthwise if not torch.is_grad_enabled() else as_depthwise_autograd)


def _conv_forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        in_per_group: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        as_depthwise: bool,
) -> torch.Tensor:
    # the weight in x's memory format: a channels_last weight would switch the conv to channels_last
    weight = in_format_of(weight, x)
    if as_depthwise:
        return grouped_conv_as_depthwise(x, weight, groups, in_per_group, out_chs, kernel_size, stride, dilation)
    return F.conv2d(x, weight, None, stride, dilation * (kernel_size // 2), dilation, groups)


class _FastForwardGroupedConv(torch.autograd.Function):
    """A grouped conv: planned forward, the grouped conv's own backward in channels_last (the
    weight gradient of stride-1 7x7 and 9x9 branches with few channels per group by FFT:
    :mod:`epsanet.layers.fft_weight_grad`).

    Saves ``x`` as the caller gave it (no extra copy lives until the backward). Under autocast
    the backward runs in the forward's compute dtype and returns gradients in the dtypes of
    ``x`` and ``weight``, as autocast's own casts would. Supports one backward pass (no double
    backward).
    """

    @staticmethod
    def forward(ctx, x, x_fwd, weight, groups, in_per_group, out_chs, kernel_size, stride, dilation, as_depthwise):
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, dilation * (kernel_size // 2), dilation, groups)
        return _conv_forward(x_fwd, weight, groups, in_per_group, out_chs, kernel_size, stride, dilation, as_depthwise)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        out_chs, in_per_group, kernel_size = weight.shape[0], weight.shape[1], weight.shape[-1]
        cl = torch.channels_last
        dtype = grad.dtype  # the forward's compute dtype (e.g. bfloat16 under autocast)
        weight_by_fft = (ctx.needs_input_grad[2] and dtype in (torch.float32, torch.float64)
                         and fft_weight_grad_pays_off(in_per_group, out_chs // groups, kernel_size, stride))
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=cl), x.to(dtype).contiguous(memory_format=cl),
            weight.to(dtype).contiguous(memory_format=cl), None, [stride, stride], [padding, padding],
            [dilation, dilation], False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and not weight_by_fft, False])
        if weight_by_fft:
            grad_w = fft_weight_grad(x.to(dtype), grad, groups, kernel_size, dilation)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, None, grad_w, None, None, None, None, None, None, None


def grouped_conv_as_depthwise(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        in_per_group: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        dilation: int,
) -> torch.Tensor:
    """``conv2d(x, weight, groups=groups)`` computed with depthwise convs and sums.

    Output channel ``j`` of group ``g`` is the sum over the group's ``I`` input channels ``i`` of
    ``x[g, i] * weight[g, j, i]``: one depthwise conv over all input channels per output channel
    ``j`` of a group, then a sum over ``i``. Same multiply-adds, but depthwise convs have
    specialised kernels. Channel counts come as ints (not from ``weight.shape``) so that
    torch.fx can trace the branch on them.
    """
    out_per_group = out_chs // groups
    per_out = weight.reshape(groups, out_per_group, in_per_group, kernel_size, kernel_size)
    outs: List[torch.Tensor] = []
    for j in range(out_per_group):
        y = F.conv2d(
            x, per_out[:, j].reshape(groups * in_per_group, 1, kernel_size, kernel_size), None, stride,
            dilation * (kernel_size // 2), dilation, groups * in_per_group)
        outs.append(y.unflatten(1, (groups, in_per_group)).sum(dim=2))
    if out_per_group == 1:
        return outs[0]
    return torch.stack(outs, dim=2).flatten(1, 2)  # channel g * out_per_group + j


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@torch.fx.wrap
def in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (NCHW or channels_last); a leaf for torch.fx."""
    if is_channels_last(like):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


@torch.fx.wrap
def to_memory_format(x: torch.Tensor, memory_format: int) -> torch.Tensor:
    """``x`` in a branch's memory format (``NCHW`` or ``CHANNELS_LAST``); other devices keep ``x``."""
    # literals, not the module constants: TorchScript cannot read globals
    if x.device.type != 'cpu':
        return x
    if memory_format == 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()
