"""The depthwise-plus-sum form of a PSA branch conv (an ONNX export form) against conv2d and its autograd."""
import pytest
import torch
import torch.nn.functional as F

from epsanet.optimize.conv_forms import ConvShape, depthwise_applies, grouped_conv_as_depthwise

CL = torch.channels_last

SHAPES = [  # in_chs, out_chs, groups, k, stride, dilation
    (64, 16, 16, 9, 1, 1),  # EPSANet-50 stage 1, 9x9: 4 in / 1 out per group
    (64, 16, 8, 7, 1, 1),  # stage 1, 7x7: 8 in / 2 out per group
    (128, 32, 16, 9, 2, 1),  # first block of stage 2: stride 2
    (32, 32, 16, 7, 1, 2),  # dilated (output_stride 16)
    (16, 16, 4, 5, 1, 1),  # 4 out per group
]


@pytest.mark.parametrize('in_chs,out_chs,groups,k,stride,dilation', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_depthwise_form_equals_conv2d_and_its_gradients_in_float64(in_chs, out_chs, groups, k, stride, dilation,
                                                                    channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, in_chs, 11, 11, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=CL)
    w = torch.randn(out_chs, in_chs // groups, k, k, dtype=torch.float64)
    args = (stride, dilation * (k // 2), dilation, groups)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = F.conv2d(xa, wa, None, *args)
    out = grouped_conv_as_depthwise(xb, wb, *args)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    up = torch.randn_like(expected)
    (expected * up).sum().backward()
    (out * up).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(wb.grad, wa.grad, atol=1e-10, rtol=1e-10)


def test_the_depthwise_form_applies_with_few_outputs_per_group():
    assert depthwise_applies(ConvShape(2, 64, 16, 56, 56, 9, 1, 4, 1, 16, 'float32', False))
    assert not depthwise_applies(ConvShape(2, 64, 64, 56, 56, 3, 1, 1, 1, 1, 'float32', False))  # 64 out per group


def test_depthwise_form_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 13, 13)
    w = torch.randn(16, 8, 7, 7) / (8 * 49) ** 0.5
    torch.testing.assert_close(grouped_conv_as_depthwise(x, w, 1, 3, 1, 8), F.conv2d(x, w, None, 1, 3, 1, 8),
                               atol=1e-5, rtol=1e-5)
