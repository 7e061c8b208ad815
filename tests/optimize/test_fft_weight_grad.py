"""The FFT weight gradient against the grouped conv's own weight gradient."""
import pytest
import torch
import torch.nn.functional as F

from epsanet.optimize import autotune, conv_forms
from epsanet.optimize.fft_weight_grad import _fast_fft_size, fft_weight_grad, fft_weight_grad_applies
from epsanet.optimize.tuned_conv import TunedConv2d


def _conv_weight_grad(x, grad, weight_shape, groups, dilation):
    weight = torch.zeros(weight_shape, dtype=x.dtype)
    pad = dilation * (weight_shape[-1] // 2)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [pad, pad], [dilation, dilation], False, [0, 0], groups,
        [False, True, False])[1]


@pytest.mark.parametrize('n,in_chs,out_chs,groups,k,h,w,dilation', [
    (2, 64, 16, 16, 9, 14, 14, 1),  # EPSANet-50 stage 1, 9x9: 4 in / 1 out per group
    (2, 64, 16, 8, 7, 14, 14, 1),  # stage 1, 7x7: 8 in / 2 out per group
    (3, 12, 6, 3, 7, 10, 13, 2),  # dilated, not square
    (1, 8, 8, 2, 9, 3, 4, 1),  # kernel larger than the map
    (2, 4, 4, 4, 3, 5, 6, 1),  # depthwise 3x3
])
def test_equals_the_conv_weight_gradient_in_float64(n, in_chs, out_chs, groups, k, h, w, dilation):
    torch.manual_seed(0)
    x = torch.randn(n, in_chs, h, w, dtype=torch.float64)
    grad = torch.randn(n, out_chs, h, w, dtype=torch.float64)
    expected = _conv_weight_grad(x, grad, (out_chs, in_chs // groups, k, k), groups, dilation)
    torch.testing.assert_close(fft_weight_grad(x, grad, groups, k, dilation), expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_float32_error_is_small(channels_last):
    torch.manual_seed(0)
    x = torch.randn(4, 64, 28, 28, dtype=torch.float64)
    grad = torch.randn(4, 16, 28, 28, dtype=torch.float64)
    expected = _conv_weight_grad(x, grad, (16, 4, 9, 9), 16, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = fft_weight_grad(x.float().contiguous(memory_format=fmt), grad.float().contiguous(memory_format=fmt), 16, 9, 1)
    assert out.dtype == torch.float32
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < 1e-5


def test_applies_to_stride_one_float():
    assert fft_weight_grad_applies(1, torch.float32) and fft_weight_grad_applies(1, torch.float64)
    assert not fft_weight_grad_applies(2, torch.float32)
    assert not fft_weight_grad_applies(1, torch.bfloat16)


def test_transform_lengths_are_fast_and_long_enough():
    assert [_fast_fft_size(n) for n in (60, 32, 33, 11, 7)] == [64, 32, 36, 12, 8]
    for n in range(1, 200):
        m = _fast_fft_size(n)
        assert m >= n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        assert m == 1


def test_a_tuned_conv_that_picks_it_matches_conv2d(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2:])
        return fft_weight_grad(*args, **kwargs)
    monkeypatch.setattr(conv_forms, 'fft_weight_grad', counted)
    monkeypatch.setenv(autotune.ENV_FORMS, 'depthwise_nchw,cl,fft')
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 16, 9, padding=4, groups=16, bias=False)
    tuned = TunedConv2d.from_conv(conv)
    x = torch.randn(2, 64, 12, 12).to(memory_format=torch.channels_last).requires_grad_(True)
    out, ref = tuned(x), F.conv2d(x, conv.weight, None, 1, 4, 1, 16)
    up = torch.randn_like(ref)
    grads = torch.autograd.grad((out * up).sum(), [x, conv.weight])
    expected = torch.autograd.grad((ref * up).sum(), [x, conv.weight])
    assert calls == [(16, 9, 1, True)]
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_input_spectrum_is_reused_while_the_input_lives(monkeypatch):
    """Two branches reading the same input (EPSANet Small) share its FFT; a changed or freed input never does."""
    import gc

    from epsanet.optimize import fft_weight_grad as module

    calls = []
    real_rfft2 = torch.fft.rfft2
    monkeypatch.setattr(torch.fft, 'rfft2', lambda t, s=None: calls.append(t.shape) or real_rfft2(t, s=s))
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    g7, g9 = torch.randn(2, 4, 12, 12, dtype=torch.float64), torch.randn(2, 4, 12, 12, dtype=torch.float64)
    a = fft_weight_grad(x, g7, 2, 7, 1)  # two branches on the same input, same transform size
    b = fft_weight_grad(x, g9, 4, 7, 1)
    assert [c for c in calls if c == x.shape] == [x.shape]  # the input transformed once
    torch.testing.assert_close(a, fft_weight_grad(x, g7, 2, 7, 1, reuse_input_spectrum=False), rtol=0, atol=0)
    torch.testing.assert_close(b, fft_weight_grad(x, g9, 4, 7, 1, reuse_input_spectrum=False), rtol=0, atol=0)
    x.mul_(2)  # changed in place: a new version, a new spectrum
    calls.clear()
    torch.testing.assert_close(fft_weight_grad(x, g7, 2, 7, 1), 2 * a)
    assert [c for c in calls if c == x.shape] == [x.shape]
    del x
    gc.collect()
    assert module._spectra == {}  # nothing kept once the input is gone
