"""Weight gradient of a grouped conv with a large kernel and few channels per group, by FFT.

The weight gradient of a stride-1 conv is a cross-correlation of the input with the output
gradient, summed over the batch: ``dW[o, i, a, b] = sum_{n,h,w} g[n, o, h, w] x[n, i, h + d(a - p),
w + d(b - p)]`` (``p`` the padding, ``d`` the dilation). With the 2-D FFTs of ``x`` and ``g``, the
sum over the batch is a product summed over ``n`` per frequency, and one inverse FFT per weight
plane gives every lag at once. oneDNN computes this gradient directly and is slow for the PSA
branches with 7x7 and 9x9 kernels and few channels per group.

Whether it is faster than the conv's own weight gradient depends on the shape and the CPU: the
autotuner (:mod:`epsanet.optimize.autotune`) times both on the running machine and keeps the faster.
"""
import weakref
from typing import Dict, Tuple

import torch

__all__ = ['fft_weight_grad', 'fft_weight_grad_applies']

# id(x) -> (weak reference to x, x's version, transform size, rfft2 of x). The PSA branches of EPSANet Small
# all read the same input, and the 7x7 and 9x9 branches pad it to the same transform size, so the second
# weight gradient reuses the first one's input spectrum. An entry lives as long as x does (the weak
# reference's callback drops it) and is used only for the same tensor object, unchanged since.
_spectra: Dict[int, Tuple[weakref.ref, int, Tuple[int, int], torch.Tensor]] = {}


def fft_weight_grad_applies(stride: int, dtype: torch.dtype) -> bool:
    """Whether :func:`fft_weight_grad` can compute a branch's weight gradient: stride 1, float32/64."""
    return stride == 1 and dtype in (torch.float32, torch.float64)


def _fast_fft_size(n: int) -> int:
    """A transform length >= ``n`` that pocketfft does quickly: a power of two when it is at most
    1/8 longer, else the next product of 2s, 3s and 5s."""
    power = 1 << (n - 1).bit_length()
    if power * 8 <= n * 9:
        return power
    m = n
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


def _input_spectrum(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``torch.fft.rfft2(x, s=size)``, computed once per input tensor and size (see ``_spectra``)."""
    key = id(x)
    entry = _spectra.get(key)
    if entry is not None and entry[0]() is x and entry[1] == x._version and entry[2] == size:
        return entry[3]
    spectrum = torch.fft.rfft2(x, s=size)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if key in _spectra and _spectra[key][0] is ref:
            del _spectra[key]
    _spectra[key] = (weakref.ref(x, forget), x._version, size, spectrum)
    return spectrum


def fft_weight_grad(x: torch.Tensor, grad: torch.Tensor, groups: int, kernel_size: int, dilation: int,
                    reuse_input_spectrum: bool = True) -> torch.Tensor:
    """The weight gradient ``[out_chs, in_chs // groups, k, k]`` of a stride-1 ``conv2d(x, w,
    padding=dilation * (k // 2), dilation=dilation, groups=groups)`` whose output gradient is ``grad``.

    Float32 or float64 (FFTs have no half-precision CPU kernels). Transform lengths are at least
    ``H + pad`` (not ``H + 2 pad``): the circular correlation's negative lags then wrap into the
    zero padding at the end. With ``reuse_input_spectrum`` the FFT of ``x`` is kept while ``x`` lives
    and reused by the next call on the same, unchanged tensor at the same transform size (the same
    numbers); the autotuner turns it off to time the form's full cost.
    """
    n, in_chs, h, w = x.shape
    out_chs = grad.shape[1]
    pad = dilation * (kernel_size // 2)
    size = (_fast_fft_size(h + pad), _fast_fft_size(w + pad))
    spectrum = _input_spectrum(x, size) if reuse_input_spectrum else torch.fft.rfft2(x, s=size)
    fx = spectrum.unflatten(1, (groups, 1, in_chs // groups))
    fg = torch.fft.rfft2(grad, s=size).unflatten(1, (groups, out_chs // groups, 1))
    corr = torch.fft.irfft2((fx * fg.conj()).sum(0), s=size)  # [groups, out/g, in/g, H', W']: every lag
    lags = torch.arange(-pad, pad + 1, dilation, device=x.device)
    corr = corr.index_select(-2, lags % size[0]).index_select(-1, lags % size[1])
    return corr.flatten(0, 1)
