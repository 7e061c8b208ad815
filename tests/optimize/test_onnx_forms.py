"""ONNX graphs in onnxruntime's fastest form: same numbers as the plain model, checked by onnxruntime."""
import logging

import pytest
import timm
import torch

from epsanet.export import export_model, load_exported
from epsanet.optimize import onnx_forms
from epsanet.optimize.onnx_forms import DepthwiseSumConv2d, optimize_for_onnxruntime


def test_depthwise_sum_conv_is_the_same_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 8, 9, padding=4, groups=8, bias=False)
    dw = DepthwiseSumConv2d.from_conv(conv)
    assert dw.weight is conv.weight and list(dw.state_dict()) == ['weight']
    x = torch.randn(2, 32, 12, 12)
    torch.testing.assert_close(dw(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('depthwise_faster', [True, False])
def test_keeps_the_faster_form_and_the_outputs(monkeypatch, tmp_path, caplog, depthwise_faster):
    caplog.set_level(logging.INFO, logger='epsanet.optimize.onnx_forms')

    def fake_ms(module, x, threads, repeats=3):  # the timing decides; pretend one form is faster
        return 1.0 if isinstance(module, DepthwiseSumConv2d) == depthwise_faster else 2.0
    monkeypatch.setattr(onnx_forms, '_ort_ms', fake_ms)
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    fast = optimize_for_onnxruntime(model, input_size=(3, 32, 32), batch_size=2)
    swapped = sum(isinstance(m, DepthwiseSumConv2d) for m in fast.modules())
    # branches with 1-4 outputs per group (and > 1 input): 5x5 of stage 1 (3 blocks), 7x7 of stages 1-2 (3 + 4),
    # 9x9 of stages 1-3 (3 + 4 + 6)
    assert swapped == (23 if depthwise_faster else 0)
    assert not any(isinstance(m, DepthwiseSumConv2d) for m in model.modules())  # the original is untouched
    assert f'{swapped} PSA branch convs as depthwise' in caplog.text
    path = tmp_path / 'm.onnx'
    export_model(fast, str(path), input_size=(3, 32, 32), check=True)  # the export's own check: <= 1e-4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(str(path), 'onnx')(x)[0], model(x), atol=1e-4, rtol=1e-4)


def test_real_timing_in_onnxruntime_gives_a_valid_model():
    model = timm.create_model('epsanet50', num_classes=4).eval()
    fast = optimize_for_onnxruntime(model, input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
