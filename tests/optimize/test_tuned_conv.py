"""TunedConv2d: the same conv (parameters, numbers, module calls) with autotuned CPU forms."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epsanet.optimize import autotune, conv_forms
from epsanet.optimize.tuned_conv import TunedConv2d

FORCED = [  # forward, input grad, weight grad: every form, each in at least one combination
    'grouped_nchw,nchw,nchw', 'grouped_cl,cl,cl', 'depthwise_nchw,cl,cl', 'depthwise_cl,nchw,nchw',
]


def _pair(dtype=torch.float64, stride=1, dilation=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 8, 7, stride=stride, padding=3 * dilation, dilation=dilation, groups=4, bias=False)
    conv = conv.to(dtype)
    return conv, TunedConv2d.from_conv(conv)


def test_shares_the_parameter_and_state_dict():
    conv, tuned = _pair()
    assert tuned.weight is conv.weight
    assert list(tuned.state_dict()) == list(conv.state_dict()) == ['weight']
    assert isinstance(tuned, nn.Conv2d)


@pytest.mark.parametrize('forced', FORCED + [None])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('stride,dilation', [(1, 1), (2, 1), (1, 2)])
def test_forward_and_gradients_equal_the_plain_conv(monkeypatch, forced, channels_last, stride, dilation):
    if forced:
        monkeypatch.setenv(autotune.ENV_FORMS, forced)
    conv, tuned = _pair(stride=stride, dilation=dilation)
    x = torch.randn(2, 32, 10, 10, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = tuned(xa), F.conv2d(xb, conv.weight, None, stride, 3 * dilation, dilation, 4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert conv_forms.is_channels_last(out) == channels_last
    up = torch.randn_like(ref)
    ga = torch.autograd.grad((out * up).sum(), [xa, conv.weight])
    gb = torch.autograd.grad((ref * up).sum(), [xb, conv.weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), ref.detach(), atol=1e-12, rtol=1e-12)


def test_hooks_fire_and_a_weight_change_is_seen():
    conv, tuned = _pair(torch.float32)
    seen = []
    tuned.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 32, 8, 8)
    tuned(x)
    with torch.no_grad():
        conv.weight.zero_()
    assert seen == [torch.Size([1, 8, 8, 8])]
    assert tuned(x).abs().max() == 0


def test_plain_conv_under_autocast_and_for_other_dtypes(monkeypatch):
    conv, tuned = _pair(torch.float32)
    monkeypatch.setattr(autotune, 'plan_forward', lambda *a: pytest.fail('autotuned under autocast'))
    x = torch.randn(1, 32, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = tuned(x)
        ref = conv(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    assert tuned.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_refuses_convs_it_cannot_run():
    with pytest.raises(ValueError, match='bias-free'):
        TunedConv2d.from_conv(nn.Conv2d(8, 8, 3, bias=True))
    assert not TunedConv2d.supports(nn.Conv2d(8, 8, 3, padding=1, padding_mode='reflect', bias=False))
    assert not TunedConv2d.supports(nn.Conv2d(8, 8, (3, 5), bias=False))
