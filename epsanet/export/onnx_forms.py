"""ONNX graphs in the form onnxruntime runs fastest: ``optimize_for_onnxruntime(model)``.

onnxruntime's CPU kernels run grouped convs with large kernels and few channels per group far below
their speed on dense and depthwise convs: its blocked (NCHWc) conv kernels need whole channel blocks
in every group. Two other forms of the same conv export to plain ONNX nodes with the same numbers:

* depthwise convs plus a sum over each group's input channels
  (:func:`~epsanet.optimize.conv_forms.grouped_conv_as_depthwise`, :class:`DepthwiseSumConv2d`): the
  same multiply-adds;
* groups merged ``m`` at a time (:class:`GroupMergedConv2d`): a conv with ``groups / m`` groups whose
  weight is block diagonal (zeros between the merged groups), ``m`` times the multiply-adds but whole
  channel blocks per group.

Which form wins depends on the shape and the CPU, so the transform times each in onnxruntime, on this
machine, for every distinct PSA branch shape at the export's input size, and keeps the fastest.
``epsanet export --format onnx`` applies it (``--onnx-forms plain`` turns it off); the export's own
check compares the file with PyTorch.
"""
import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import onnx_export
from ..layers.psa import PyramidSqueezeAttention
from ..optimize.conv_forms import ConvShape, conv_sharing_weight, depthwise_applies, grouped_conv_as_depthwise
from ..optimize.fast_psa import psa_sharing_modules

__all__ = ['DepthwiseSumConv2d', 'ExportPSA', 'GroupMergedConv2d', 'optimize_for_onnxruntime']

_logger = logging.getLogger(__name__)

MERGES = (2, 4)  # group-merge factors tried


class DepthwiseSumConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameter, same numbers) computed as depthwise convs plus sums, in plain
    torch ops, so that tracing and ONNX export record that form. Build it with :meth:`from_conv`.

    ``out_hw`` (set by :func:`optimize_for_onnxruntime` to the output size at the export's input size)
    gives the reshapes constant shapes while tracing; eager calls work at any size.
    """

    out_hw: Optional[Tuple[int, int]] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, out_hw: Optional[Tuple[int, int]] = None) -> 'DepthwiseSumConv2d':
        new = conv_sharing_weight(cls, conv)
        new.out_hw = out_hw
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        out_hw = self.out_hw if torch.jit.is_tracing() else None
        return grouped_conv_as_depthwise(x, self.weight, self.stride[0], self.padding[0], self.dilation[0], self.groups,
                                         shape, out_hw)


class GroupMergedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameter, same numbers) run as a conv with ``groups / merge`` groups and a
    block-diagonal weight built from the parameter (constant-folded at export). Build it with
    :meth:`from_conv`."""

    merge: int

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, merge: int) -> 'GroupMergedConv2d':
        if merge < 2 or conv.groups % merge:
            raise ValueError(f'cannot merge the {conv.groups} groups of {conv} {merge} at a time.')
        new = conv_sharing_weight(cls, conv)
        new.merge = merge
        return new

    def merged_weight(self) -> torch.Tensor:
        """``[out, merge * in_per_group, kh, kw]``: each merged group's weights on its own inputs, zeros elsewhere."""
        m, g = self.merge, self.groups
        out_pg, in_pg = self.out_channels // g, self.in_channels // g
        kh, kw = self.kernel_size
        mask = torch.eye(m, dtype=self.weight.dtype, device=self.weight.device).reshape(1, m, 1, m, 1, 1, 1)
        w = self.weight.reshape(g // m, m, out_pg, 1, in_pg, kh, kw) * mask
        return w.reshape(self.out_channels, m * in_pg, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.groups // self.merge
        return F.conv2d(x, self.merged_weight(), None, self.stride, self.padding, self.dilation, groups)


class ExportPSA(PyramidSqueezeAttention):
    """A PSA layer (same submodules, same numbers within float rounding) whose attention keeps the batch as
    the first dimension of every intermediate tensor: the SE module sees the branches as the ``S x 1``
    positions of an ``[N, C, S, 1]`` map instead of a batch of ``N * S`` vectors. In the exported graph every
    reshape then keeps the batch (see :func:`epsanet.export.keep_batch_in_reshapes`), so ONNX shape inference
    can show that the block's residual ``Add`` has equal input shapes, which onnxruntime needs to fuse it
    into a conv. Export only: the plain layer keeps its batched SE call over ``[N * S, C, 1, 1]``, whose
    rounding follows the authors' per-branch calls closely enough for deep float32 networks to match the
    reference within 1e-5; this form's does not (tried: EPSANet-101 Large gradients differ by 5e-5)."""

    def attention(self, feats: torch.Tensor) -> torch.Tensor:
        s, c = self.num_branches, self.branch_chs
        means = feats.mean(dim=(2, 3)).reshape(-1, s, c).transpose(1, 2).unsqueeze(-1)  # [N, C, S, 1]
        weights = self.se(means).softmax(dim=2)
        return weights.squeeze(-1).transpose(1, 2).reshape(-1, s * c, 1, 1)


def _forms(conv: nn.Conv2d, shape: ConvShape) -> Dict[str, Callable[[nn.Conv2d], nn.Module]]:
    """The candidate forms of a branch conv for onnxruntime: name -> factory."""
    forms: Dict[str, Callable[[nn.Conv2d], nn.Module]] = {'grouped': lambda c: c}
    if depthwise_applies(shape):
        forms['depthwise'] = lambda c: DepthwiseSumConv2d.from_conv(c, _out_hw(shape))
    for m in MERGES:
        if conv.groups % m == 0:
            forms[f'merged{m}'] = lambda c, m=m: GroupMergedConv2d.from_conv(c, m)
    return forms


def _out_hw(shape: ConvShape) -> Tuple[int, int]:
    k, s, p, d = shape.kernel_size, shape.stride, shape.padding, shape.dilation
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in (shape.height, shape.width))


def _branch_shapes(model: nn.Module, example: torch.Tensor) -> Dict[nn.Conv2d, ConvShape]:
    shapes: Dict[nn.Conv2d, ConvShape] = {}
    convs = [c for m in model.modules() if isinstance(m, PyramidSqueezeAttention) for c in m.convs
             if type(c) is nn.Conv2d and c.bias is None and isinstance(c.padding, tuple)]

    def record(conv, inputs, _out):
        n, ch, h, w = inputs[0].shape
        shapes[conv] = ConvShape(n, ch, conv.out_channels, h, w, conv.kernel_size[0], conv.stride[0],
                                 conv.padding[0], conv.dilation[0], conv.groups, 'float32', False)
    hooks = [c.register_forward_hook(record) for c in convs]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _ort_ms(module: nn.Module, x: torch.Tensor, threads: int, repeats: int = 3) -> float:
    from . import onnxruntime_session

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        path = os.path.join(tmp, 'conv.onnx')
        onnx_export(module, (x,), path, opset_version=17)
        session = onnxruntime_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def optimize_for_onnxruntime(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                             threads: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` (eval mode) whose PSA branch convs are in the form onnxruntime runs fastest
    for their shape at ``input_size`` and ``batch_size``, timed with ``threads`` threads (default:
    torch's). Same parameters and outputs; for export only (see the module docstring)."""
    threads = threads or torch.get_num_threads()
    model = copy.deepcopy(model).eval()
    example = torch.zeros(batch_size, *input_size)
    shapes = _branch_shapes(model, example)
    _swap_export_psa(model)
    chosen: Dict[ConvShape, str] = {}
    for psa in [m for m in model.modules() if isinstance(m, PyramidSqueezeAttention)]:
        for i, conv in enumerate(psa.convs):
            shape = shapes.get(conv)
            if shape is None or conv.groups == 1:
                continue
            forms = _forms(conv, shape)
            if shape not in chosen:
                x = torch.randn(shape.batch, shape.in_chs, shape.height, shape.width)
                ms = {name: _ort_ms(make(conv), x, threads) for name, make in forms.items()}
                chosen[shape] = min(ms, key=ms.get)
                _logger.debug(f'onnxruntime, {shape}: ' + ', '.join(f'{k} {v:.2f} ms' for k, v in ms.items()))
            psa.convs[i] = forms[chosen[shape]](conv)
    counts = {name: sum(1 for psa in model.modules() if isinstance(psa, PyramidSqueezeAttention)
                        for c in psa.convs if _form_name(c) == name) for name in ('depthwise', 'merged')}
    _logger.info(f'optimize_for_onnxruntime: {counts["depthwise"]} PSA branch convs as depthwise convs plus sums, '
                 f'{counts["merged"]} with merged groups (measured faster in onnxruntime on this CPU at '
                 f'{tuple(input_size)}, batch {batch_size}).')
    return model


def _swap_export_psa(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is PyramidSqueezeAttention:
                setattr(parent, name, psa_sharing_modules(ExportPSA, child))


def _form_name(conv: nn.Module) -> str:
    if isinstance(conv, DepthwiseSumConv2d):
        return 'depthwise'
    if isinstance(conv, GroupMergedConv2d):
        return 'merged'
    return 'grouped'
