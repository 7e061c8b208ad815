"""ONNX graphs in the form onnxruntime runs fastest: ``optimize_for_onnxruntime(model)``.

onnxruntime's CPU kernels run grouped convs with large kernels and few channels per group far below
their speed on depthwise convs. The same conv written as depthwise convs plus a sum over each group's
input channels (:func:`~epsanet.optimize.conv_forms.grouped_conv_as_depthwise`) has the same
multiply-adds and numbers, and exports to ONNX as plain ``Conv``/``ReduceSum`` nodes. Which form wins
depends on the shape and the CPU, so the transform times both in onnxruntime, on this machine, for
every distinct PSA branch shape at the export's input size, and keeps the faster one per shape.
``epsanet export --format onnx`` applies it (``--onnx-forms plain`` turns it off); the export's own
check compares the file with PyTorch.
"""
import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.psa import PyramidSqueezeAttention
from .conv_forms import ConvShape, forward_candidates, grouped_conv_as_depthwise

__all__ = ['DepthwiseSumConv2d', 'optimize_for_onnxruntime']

_logger = logging.getLogger(__name__)


class DepthwiseSumConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameter, same numbers) computed as depthwise convs plus sums, in plain
    torch ops, so that tracing and ONNX export record that form. Build it with :meth:`from_conv`."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> 'DepthwiseSumConv2d':
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, bias=False, device='meta')
        new.weight = conv.weight
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_conv_as_depthwise(x, self.weight, self.stride[0], self.padding[0], self.dilation[0], self.groups)


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
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        path = os.path.join(tmp, 'conv.onnx')
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
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
    chosen: Dict[Tuple, bool] = {}
    for psa in [m for m in model.modules() if isinstance(m, PyramidSqueezeAttention)]:
        for i, conv in enumerate(psa.convs):
            shape = shapes.get(conv)
            if shape is None or 'depthwise_nchw' not in forward_candidates(shape):
                continue
            if shape not in chosen:
                x = torch.randn(shape.batch, shape.in_chs, shape.height, shape.width)
                grouped = _ort_ms(conv, x, threads)
                depthwise = _ort_ms(DepthwiseSumConv2d.from_conv(conv), x, threads)
                chosen[shape] = depthwise < grouped
                _logger.debug(f'onnxruntime, {shape}: grouped {grouped:.2f} ms, depthwise {depthwise:.2f} ms')
            if chosen[shape]:
                psa.convs[i] = DepthwiseSumConv2d.from_conv(conv)
    swapped = sum(isinstance(m, DepthwiseSumConv2d) for m in model.modules())
    _logger.info(f'optimize_for_onnxruntime: {swapped} PSA branch convs as depthwise convs plus sums '
                 f'(measured faster in onnxruntime on this CPU at {tuple(input_size)}, batch {batch_size}).')
    return model
