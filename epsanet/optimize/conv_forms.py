"""The shape of a PSA branch conv and its depthwise-plus-sum form, for the ONNX export forms
(:mod:`epsanet.export.onnx_forms`).

A PSA branch is a grouped conv with a large kernel and few channels per group.
:func:`grouped_conv_as_depthwise` computes exactly ``F.conv2d(x, weight, None, stride, padding, dilation,
groups)`` with one depthwise conv per output channel of a group, then a sum over the group's input channels:
the same multiply-adds, but depthwise convs have specialised kernels.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ConvShape', 'conv_sharing_weight', 'depthwise_applies', 'grouped_conv_as_depthwise', 'in_format_of']

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


def in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (NCHW or channels_last)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def depthwise_applies(shape: ConvShape) -> bool:
    """Whether the depthwise form is worth trying for ``shape``: more than one input and few outputs per group."""
    return shape.in_per_group > 1 and shape.out_per_group <= MAX_DEPTHWISE_OUTPUTS


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
