"""``TunedConv2d``: an ``nn.Conv2d`` whose CPU passes run in the forms measured fastest on this machine.

It holds exactly the parameters of the conv it replaces (same names, shapes and tensors), is called as
a module (hooks fire, FLOP counters see a ``Conv2d``) and computes the same numbers. On CPU, in float32
or float64 without autocast, its forward runs the form :func:`~epsanet.optimize.autotune.plan_forward`
chose and, under autograd, a custom backward computes the input and weight gradients in the forms
:func:`~epsanet.optimize.autotune.plan_backward` chose. Anywhere else (another device, autocast,
TorchScript, tracing, torch.compile) it is a plain ``nn.Conv2d``.
"""
from typing import Optional

import torch
from torch import nn

from .._compat import autocast_enabled, is_compiling
from . import autotune, conv_forms
from .conv_forms import ConvShape, conv_sharing_weight

__all__ = ['TunedConv2d']


class TunedConv2d(nn.Conv2d):
    """A bias-free, zero-padded ``nn.Conv2d`` with autotuned CPU forms (see the module docstring).

    Build it with :meth:`from_conv`, which shares the original conv's parameters.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> 'TunedConv2d':
        """A ``TunedConv2d`` holding ``conv``'s own weight tensor (no copy)."""
        if not cls.supports(conv):
            raise ValueError(f'TunedConv2d needs a bias-free, zero-padded, square nn.Conv2d, got {conv}.')
        return conv_sharing_weight(cls, conv)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Whether ``conv`` can become a ``TunedConv2d``: a plain ``nn.Conv2d``, no bias, zero padding,
        square kernel, equal strides, paddings and dilations."""
        return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == 'zeros'
                and isinstance(conv.padding, tuple) and len(set(conv.kernel_size)) == 1
                and len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1 and len(set(conv.dilation)) == 1)

    def _shape(self, x: torch.Tensor) -> ConvShape:
        n, c, h, w = x.shape
        return ConvShape(n, c, self.out_channels, h, w, self.kernel_size[0], self.stride[0], self.padding[0],
                         self.dilation[0], self.groups, str(x.dtype).replace('torch.', ''),
                         conv_forms.is_channels_last(x))

    def _tunable(self, x: torch.Tensor) -> bool:
        return (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
                and self.weight.dtype == x.dtype and not autocast_enabled('cpu')
                and not torch.jit.is_scripting() and not torch.jit.is_tracing() and not is_compiling()
                and isinstance(x, torch.Tensor) and type(x) is torch.Tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tunable(x):
            return super().forward(x)
        shape = self._shape(x)
        form = autotune.plan_forward(shape, x.detach(), self.weight.detach())
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _TunedConvFunction.apply(x, self.weight, shape, form)
        return conv_forms.run_forward(form, x, self.weight, shape.stride, shape.padding, shape.dilation, shape.groups)


class _TunedConvFunction(torch.autograd.Function):
    """The conv in a chosen forward form; gradients in the forms the autotuner chooses at the first
    backward pass. Saves the input and weight as given (no extra copies). Supports one backward pass
    (no double backward: use the plain model for that)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, shape: ConvShape, form: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.shape = shape
        return conv_forms.run_forward(form, x, weight, shape.stride, shape.padding, shape.dilation, shape.groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        shape = ctx.shape
        args = (shape.stride, shape.padding, shape.dilation, shape.groups)
        input_form, weight_form = autotune.plan_backward(shape, grad, x, weight)
        grad_x: Optional[torch.Tensor] = None
        grad_w: Optional[torch.Tensor] = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and input_form == weight_form:
            return (*conv_forms.input_and_weight_grad(input_form, grad, x, weight, *args), None, None)
        if ctx.needs_input_grad[0]:
            grad_x = conv_forms.input_grad(input_form, grad, x, weight, *args)
        if ctx.needs_input_grad[1]:
            grad_w = conv_forms.weight_grad(weight_form, grad, x, weight, *args)
        return grad_x, grad_w, None, None
