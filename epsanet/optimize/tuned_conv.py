"""``TunedConv2d``: a PSA branch conv whose CPU inference runs in the form measured fastest on this machine.

A PSA branch is a grouped conv with a large kernel and few channels per group. PyTorch's CPU kernels
run such a conv at very different speeds depending on the memory format and the kernel: the grouped
conv in channels_last can be several times slower than in NCHW, or than the same conv computed as
depthwise convs plus sums (:func:`~epsanet.optimize.conv_forms.grouped_conv_as_depthwise`), and which
form wins changes with the shape and the CPU. So, as ``torch.backends.cudnn.benchmark`` does for cuDNN,
the first time a conv meets an input of a new shape, every form in :data:`FORMS` that applies is run on
that input and timed (once to warm up, then :data:`REPEATS` times, the minimum counts),
and the fastest is kept for the rest of the process. The key holds the conv's settings and the input's
shape, dtype and memory format, and the thread count.

The forms agree within float rounding and are plain differentiable torch ops (gradients, e.g. for
Grad-CAM, flow through them). On another device, under autocast, tracing, scripting or ``torch.compile``,
the module is a plain ``nn.Conv2d``. Only ``optimize_for_inference`` installs it: training keeps the plain conv.
"""
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import autocast_enabled, is_compiling
from .conv_forms import ConvShape, conv_sharing_weight, depthwise_applies, grouped_conv_as_depthwise, in_format_of

__all__ = ['FORMS', 'TunedConv2d', 'clear_plans', 'run_form']

#: the forms a branch conv may run in: the grouped conv or its depthwise-plus-sum form, in NCHW or channels_last
FORMS = ('grouped_nchw', 'grouped_cl', 'depthwise_nchw', 'depthwise_cl')
REPEATS = 3

_plans: Dict[Tuple, str] = {}  # (conv settings, input shape, dtype, channels_last, threads) -> form


def clear_plans() -> None:
    """Forget every measured choice (the next inference call of each shape measures again)."""
    _plans.clear()


def run_form(form: str, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (bias-free, zero padding) computed in ``form``, returned in ``x``'s memory format."""
    fmt = torch.channels_last if form.endswith('_cl') else torch.contiguous_format
    xf = x.contiguous(memory_format=fmt)
    stride, padding, dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
    if form.startswith('depthwise'):
        out = grouped_conv_as_depthwise(xf, conv.weight, stride, padding, dilation, conv.groups)
    else:
        out = F.conv2d(xf, conv.weight.contiguous(memory_format=fmt), None, stride, padding, dilation, conv.groups)
    return in_format_of(out, x)


def _fastest(candidates: List[str], run: Callable[[str], torch.Tensor]) -> str:
    times = {}
    for form in candidates:
        run(form)
        best = float('inf')
        for _ in range(REPEATS):
            start = time.perf_counter()
            run(form)
            best = min(best, time.perf_counter() - start)
        times[form] = best
    return min(times, key=times.get)


class TunedConv2d(nn.Conv2d):
    """A bias-free, zero-padded ``nn.Conv2d`` whose CPU inference runs in the fastest form (module docstring).

    Build it with :meth:`from_conv`, which shares the original conv's weight tensor.
    """

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain square conv that the forms compute exactly."""
        return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == 'zeros'
                and isinstance(conv.padding, tuple) and len(set(conv.kernel_size)) == 1
                and len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1 and len(set(conv.dilation)) == 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> 'TunedConv2d':
        if not cls.supports(conv):
            raise ValueError(f'TunedConv2d computes bias-free, zero-padded square convs only: got {conv}.')
        return conv_sharing_weight(cls, conv)

    def _shape(self, x: torch.Tensor) -> ConvShape:
        n, c, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return ConvShape(n, c, self.out_channels, h, w, self.kernel_size[0], self.stride[0], self.padding[0],
                         self.dilation[0], self.groups, str(x.dtype), channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != 'cpu' or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64)
                or x.dtype != self.weight.dtype or autocast_enabled('cpu') or torch.jit.is_tracing()
                or torch.jit.is_scripting() or is_compiling()):
            return super().forward(x)
        shape = self._shape(x)
        key = (shape, torch.get_num_threads())
        form = _plans.get(key)
        if form is None:
            candidates = [f for f in FORMS if not f.startswith('depthwise') or depthwise_applies(shape)]
            with torch.no_grad():
                form = _plans[key] = _fastest(candidates, lambda f: run_form(f, self, x.detach()))
        return run_form(form, self, x)
