"""TunedConv2d (the inference transform's PSA branch convs) against conv2d: every form, the choice, the fallbacks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epsanet.optimize import TunedConv2d, tuned_conv
from epsanet.optimize.tuned_conv import FORMS, run_form

CL = torch.channels_last
SHAPES = [  # in_chs, out_chs, groups, k, stride, dilation
    (64, 16, 16, 9, 1, 1),  # EPSANet-50 stage 1, 9x9: 4 in / 1 out per group
    (64, 16, 4, 5, 1, 1),  # 4 out per group
    (128, 32, 8, 7, 2, 1),  # first block of stage 2: stride 2
    (32, 32, 16, 7, 1, 2),  # dilated (output_stride 16)
    (16, 16, 1, 3, 1, 1),  # a dense branch: no depthwise form
]


def _conv(in_chs, out_chs, groups, k, stride, dilation, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Conv2d(in_chs, out_chs, k, stride, dilation * (k // 2), dilation, groups, bias=False).to(dtype)


@pytest.mark.parametrize('in_chs,out_chs,groups,k,stride,dilation', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_every_form_equals_conv2d_in_the_inputs_layout(in_chs, out_chs, groups, k, stride, dilation, channels_last):
    conv = _conv(in_chs, out_chs, groups, k, stride, dilation)
    x = torch.randn(2, in_chs, 11, 11, dtype=torch.float64)
    x = x.to(memory_format=CL) if channels_last else x
    expected = F.conv2d(x, conv.weight, None, stride, dilation * (k // 2), dilation, groups)
    forms = FORMS if out_chs // groups <= 4 and in_chs > groups else [f for f in FORMS if f.startswith('grouped')]
    for form in forms:
        out = run_form(form, conv, x)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10, msg=lambda m, f=form: f'{f}: {m}')
        assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_tuned_conv_measures_once_per_shape_and_keeps_the_numbers_and_gradients(dtype):
    tuned_conv.clear_plans()
    conv = _conv(64, 16, 16, 9, 1, 1, dtype)
    tuned = TunedConv2d.from_conv(conv)
    assert tuned.weight is conv.weight and list(tuned.state_dict()) == ['weight']
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 64, 13, 13, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), conv(x), **tol)
    assert len(tuned_conv._plans) == 1 and next(iter(tuned_conv._plans.values())) in FORMS
    with torch.no_grad():
        tuned(x), tuned(x.to(memory_format=CL)), tuned(x[:1])
    assert len(tuned_conv._plans) == 3  # a new layout and a new batch are new shapes; the same shape is not
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()  # gradients flow through the chosen form
    (conv(xa) ** 2).sum().backward()
    grad_w = conv.weight.grad.clone()
    conv.weight.grad = None
    (tuned(xb) ** 2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    scale = float(grad_w.abs().max())  # a weight gradient sums over the batch and the map: compare to its size
    torch.testing.assert_close(conv.weight.grad / scale, grad_w / scale, **tol)


def test_hooks_fire_and_tracing_records_a_plain_conv():
    tuned = TunedConv2d.from_conv(_conv(64, 16, 8, 7, 1, 1, torch.float32))
    seen = []
    tuned.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 64, 9, 9)
    with torch.no_grad():
        tuned(x)
        assert seen == [torch.Size([1, 16, 9, 9])]
        traced = torch.jit.trace(tuned, x)
    assert [n.kind() for n in traced.inlined_graph.nodes() if 'conv' in n.kind()] == ['aten::_convolution']


def test_only_plain_square_bias_free_convs_are_tuned():
    assert TunedConv2d.supports(nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False))
    assert not TunedConv2d.supports(nn.Conv2d(8, 8, 3, padding=1))  # bias
    assert not TunedConv2d.supports(nn.Conv2d(8, 8, (3, 5), bias=False))
    assert not TunedConv2d.supports(nn.Conv2d(8, 8, 3, padding=1, padding_mode='reflect', bias=False))
    with pytest.raises(ValueError, match='bias-free'):
        TunedConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1))
