"""Every formulation the autotuner can pick against conv2d and its autograd, in float64."""
import pytest
import torch
import torch.nn.functional as F

from epsanet.optimize import conv_forms
from epsanet.optimize.conv_forms import ConvShape

CL = torch.channels_last
TOL = dict(atol=1e-10, rtol=1e-10)

SHAPES = [  # in_chs, out_chs, groups, k, stride, dilation
    (64, 16, 16, 9, 1, 1),  # EPSANet-50 stage 1, 9x9: 4 in / 1 out per group
    (64, 16, 8, 7, 1, 1),  # stage 1, 7x7: 8 in / 2 out per group
    (128, 32, 16, 9, 2, 1),  # first block of stage 2: stride 2
    (32, 32, 16, 7, 1, 2),  # dilated (output_stride 16)
    (16, 16, 4, 5, 1, 1),  # 4 out per group
    (16, 8, 1, 3, 1, 1),  # dense 3x3
]


def _shape(x, w, stride, dilation, groups):
    k = w.shape[-1]
    return ConvShape(x.shape[0], x.shape[1], w.shape[0], x.shape[2], x.shape[3], k, stride, dilation * (k // 2),
                     dilation, groups, 'float64', conv_forms.is_channels_last(x))


def _inputs(in_chs, out_chs, groups, k, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, in_chs, 11, 11, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=CL)
    w = torch.randn(out_chs, in_chs // groups, k, k, dtype=torch.float64)
    return x, w


@pytest.mark.parametrize('in_chs,out_chs,groups,k,stride,dilation', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_every_form_equals_conv2d_and_its_gradients(in_chs, out_chs, groups, k, stride, dilation, channels_last):
    x, w = _inputs(in_chs, out_chs, groups, k, channels_last)
    pad = dilation * (k // 2)
    shape = _shape(x, w, stride, dilation, groups)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = F.conv2d(xr, wr, None, stride, pad, dilation, groups)
    up = torch.randn_like(expected)
    gx_ref, gw_ref = torch.autograd.grad((expected * up).sum(), [xr, wr])
    args = (stride, pad, dilation, groups)
    for form in conv_forms.forward_candidates(shape):
        out = conv_forms.run_forward(form, x, w, *args)
        torch.testing.assert_close(out, expected.detach(), **TOL, msg=lambda m, f=form: f'{f}: {m}')
        assert conv_forms.is_channels_last(out) == channels_last  # back in the caller's format
    for form in conv_forms.INPUT_GRAD_FORMS:
        gx = conv_forms.input_grad(form, up, x, w, *args)
        torch.testing.assert_close(gx, gx_ref, **TOL, msg=lambda m, f=form: f'input grad {f}: {m}')
        assert conv_forms.is_channels_last(gx) == channels_last
    for form in conv_forms.WEIGHT_GRAD_FORMS:
        gw = conv_forms.weight_grad(form, up, x, w, *args)
        torch.testing.assert_close(gw, gw_ref, **TOL, msg=lambda m, f=form: f'weight grad {f}: {m}')


def test_candidates_follow_the_shape():
    shape = ConvShape(2, 64, 16, 56, 56, 9, 1, 4, 1, 16, 'float32', False)
    assert conv_forms.forward_candidates(shape) == list(conv_forms.FORWARD_FORMS)
    wide = ConvShape(2, 64, 64, 56, 56, 3, 1, 1, 1, 1, 'float32', False)  # 64 outputs per group
    assert conv_forms.forward_candidates(wide) == ['grouped_nchw', 'grouped_cl']


def test_depthwise_form_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 13, 13)
    fan_in = 8 * 49
    w = torch.randn(16, 8, 7, 7) / fan_in ** 0.5
    torch.testing.assert_close(conv_forms.grouped_conv_as_depthwise(x, w, 1, 3, 1, 8), F.conv2d(x, w, None, 1, 3, 1, 8),
                               atol=1e-5, rtol=1e-5)
