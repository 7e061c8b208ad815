"""Formulations of a grouped conv that give the same numbers, for the autotuner to choose from.

A PSA branch is a grouped conv with a large kernel and few channels per group. How fast a CPU
library runs it depends on the shape, the memory format, the pass and the CPU itself (its ISA and
cache sizes), so no fixed rule is right everywhere. Each form here computes exactly
``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` and returns it in ``x``'s memory
format; :mod:`epsanet.optimize.autotune` times them on the running machine.

Forward forms (``FORWARD_FORMS``):

* ``grouped_nchw`` / ``grouped_cl``: the grouped conv itself, run in NCHW or channels_last;
* ``depthwise_nchw`` / ``depthwise_cl``: one depthwise conv per output channel of a group, then a
  sum over the group's input channels (:func:`grouped_conv_as_depthwise`). The same multiply-adds,
  but depthwise convs have specialised kernels.

Backward forms: the input and the weight gradient by the conv's own backward in NCHW or channels_last
(``INPUT_GRAD_FORMS``, ``WEIGHT_GRAD_FORMS``).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'ConvShape', 'FORWARD_FORMS', 'INPUT_GRAD_FORMS', 'WEIGHT_GRAD_FORMS', 'forward_candidates',
    'grouped_conv_as_depthwise', 'run_forward', 'input_grad', 'weight_grad',
    'input_and_weight_grad',
    'is_channels_last', 'in_format_of', 'conv_sharing_weight',
]

FORWARD_FORMS = ('grouped_nchw', 'grouped_cl', 'depthwise_nchw', 'depthwise_cl')
INPUT_GRAD_FORMS = ('nchw', 'cl')
WEIGHT_GRAD_FORMS = ('nchw', 'cl')
MAX_DEPTHWISE_OUTPUTS = 4  # the depthwise form runs one conv per output channel of a group


@dataclass(frozen=True)
class ConvShape:
    """What a conv's speed depends on: its hyper-parameters and the input's shape, dtype and format."""
    batch: int
    in_chs: int
    out_chs: int
    height: int
    width: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    groups: int
    dtype: str
    channels_last: bool

    @property
    def in_per_group(self) -> int:
        return self.in_chs // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_chs // self.groups


def conv_sharing_weight(cls: Type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """A bias-free ``cls`` (an ``nn.Conv2d`` subclass with another forward) with ``conv``'s settings and train/eval
    mode, holding ``conv``'s own weight tensor (no copy, so the state dict is unchanged)."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, bias=False, device='meta')
    new.weight = conv.weight
    new.train(conv.training)
    return new


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is stored channels_last (and not also plain contiguous, e.g. 1x1 maps)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (NCHW or channels_last)."""
    return t.contiguous(memory_format=torch.channels_last if is_channels_last(like) else torch.contiguous_format)


def _to(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def forward_candidates(shape: ConvShape) -> List[str]:
    """The forward forms that apply to ``shape`` (the depthwise forms only with few outputs per group)."""
    forms = ['grouped_nchw', 'grouped_cl']
    if shape.in_per_group > 1 and shape.out_per_group <= MAX_DEPTHWISE_OUTPUTS:
        forms += ['depthwise_nchw', 'depthwise_cl']
    return forms


def grouped_conv_as_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                              groups: int, weight_shape: Optional[Tuple[int, int, int, int]] = None,
                              out_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``conv2d(x, weight, groups=groups)`` computed with depthwise convs and sums.

    Output channel ``j`` of group ``g`` is the sum over the group's ``I`` input channels ``i`` of
    ``x[g, i] * weight[g, j, i]``: one depthwise conv over all input channels per output channel ``j``
    of a group, then a sum over ``i``. For tracing (ONNX export), which would otherwise record sizes as
    tensors computed from the input's shape, ``weight_shape`` gives the weight's shape and ``out_hw``
    the output's height and width as Python ints: the graph's reshapes then have constant shapes
    (batch ``-1``), which ONNX shape inference can follow.
    """
    out_chs, in_per_group, kh, kw = weight_shape or weight.shape
    out_per_group = out_chs // groups
    per_out = weight.reshape(groups, out_per_group, in_per_group, kh, kw)
    outs: List[torch.Tensor] = []
    for j in range(out_per_group):
        w = per_out[:, j].reshape(groups * in_per_group, 1, kh, kw)
        y = F.conv2d(x, in_format_of(w, x), None, stride, padding, dilation, groups * in_per_group)
        y = y.reshape(-1, groups, in_per_group, *out_hw) if out_hw else y.unflatten(1, (groups, in_per_group))
        outs.append(y.sum(dim=2))
    if out_per_group == 1:
        return outs[0]
    stacked = torch.stack(outs, dim=2)  # channel g * out_per_group + j
    return stacked.reshape(-1, out_chs, *out_hw) if out_hw else stacked.flatten(1, 2)


def run_forward(form: str, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                groups: int) -> torch.Tensor:
    """The conv in forward form ``form`` (one of :data:`FORWARD_FORMS`), returned in ``x``'s format."""
    channels_last = form.endswith('_cl')
    xf = _to(x, channels_last)
    if form.startswith('depthwise'):
        out = grouped_conv_as_depthwise(xf, weight, stride, padding, dilation, groups)
    else:
        out = F.conv2d(xf, _to(weight, channels_last), None, stride, padding, dilation, groups)
    return in_format_of(out, x)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                   dilation: int, groups: int, channels_last: bool, mask: List[bool]):
    return torch.ops.aten.convolution_backward(
        _to(grad, channels_last), _to(x, channels_last), _to(weight, channels_last), None, [stride, stride],
        [padding, padding], [dilation, dilation], False, [0, 0], groups, mask)


def input_grad(form: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
               dilation: int, groups: int) -> torch.Tensor:
    """The gradient of the conv's input in form ``form`` (``'nchw'`` or ``'cl'``), in ``x``'s format."""
    gx = _conv_backward(grad, x, weight, stride, padding, dilation, groups, form == 'cl', [True, False, False])[0]
    return in_format_of(gx, x)


def input_and_weight_grad(form: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
                          padding: int, dilation: int, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both gradients in one call of the conv's own backward in form ``form`` (``'nchw'`` or ``'cl'``): the same
    numbers as :func:`input_grad` and :func:`weight_grad`, with ``grad`` and ``x`` converted to that format once."""
    gx, gw, _ = _conv_backward(grad, x, weight, stride, padding, dilation, groups, form == 'cl', [True, True, False])
    return in_format_of(gx, x), in_format_of(gw, weight)


def weight_grad(form: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                dilation: int, groups: int) -> torch.Tensor:
    """The gradient of the conv's weight in form ``form`` (``'nchw'`` or ``'cl'``), in the weight's memory format."""
    gw = _conv_backward(grad, x, weight, stride, padding, dilation, groups, form == 'cl', [False, True, False])[1]
    return in_format_of(gw, weight)
