"""ONNX graphs in onnxruntime's fastest form: same numbers as the plain model, checked by onnxruntime."""
import logging

import pytest
import timm
import torch

import epsanet
from epsanet import PSA
from epsanet.export import export_model, load_exported, onnx_forms
from epsanet.export.onnx_forms import DepthwiseSumConv2d, GroupMergedConv2d, optimize_for_onnxruntime


def test_depthwise_sum_conv_is_the_same_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 8, 9, padding=4, groups=8, bias=False)
    dw = DepthwiseSumConv2d.from_conv(conv)
    assert dw.weight is conv.weight and list(dw.state_dict()) == ['weight']
    x = torch.randn(2, 32, 12, 12)
    torch.testing.assert_close(dw(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('merge', [2, 4])
def test_group_merged_conv_is_the_same_conv(merge):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 5, stride=2, padding=2, groups=8, bias=False)
    merged = GroupMergedConv2d.from_conv(conv, merge)
    assert merged.weight is conv.weight and list(merged.state_dict()) == ['weight']
    w = merged.merged_weight()
    assert w.shape == (32, 8 * merge, 5, 5) and (w != 0).sum() == conv.weight.numel()  # block diagonal
    x = torch.randn(2, 64, 12, 12)
    torch.testing.assert_close(merged(x), conv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='cannot merge'):
        GroupMergedConv2d.from_conv(conv, 3)


@pytest.mark.parametrize('fastest', ['depthwise', 'merged', 'grouped'])
def test_keeps_the_faster_form_and_the_outputs(monkeypatch, tmp_path, caplog, fastest):
    caplog.set_level(logging.INFO, logger='epsanet.export.onnx_forms')
    kinds = {'depthwise': DepthwiseSumConv2d, 'merged': GroupMergedConv2d}

    def fake_ms(module, x, threads, repeats=3):  # the timing decides; pretend one form is faster
        return 1.0 if fastest in kinds and isinstance(module, kinds[fastest]) else 2.0
    monkeypatch.setattr(onnx_forms, '_ort_ms', fake_ms)
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    fast = optimize_for_onnxruntime(model, input_size=(3, 32, 32), batch_size=2)
    depthwise = sum(isinstance(m, DepthwiseSumConv2d) for m in fast.modules())
    merged = sum(isinstance(m, GroupMergedConv2d) for m in fast.modules())
    # depthwise: branches with 1-4 outputs per group (and > 1 input): 5x5 of stage 1 (3 blocks), 7x7 of stages
    # 1-2 (3 + 4), 9x9 of stages 1-3 (3 + 4 + 6); merged: every grouped branch (3 per block, 16 blocks)
    assert (depthwise, merged) == {'depthwise': (23, 0), 'merged': (0, 48), 'grouped': (0, 0)}[fastest]
    assert not any(isinstance(m, (DepthwiseSumConv2d, GroupMergedConv2d)) for m in model.modules())  # untouched
    assert f'{depthwise} PSA branch convs as depthwise convs plus sums, {merged} with merged groups' in caplog.text
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


def _batch_dims(path):
    """The first dimension of every tensor ONNX shape inference can type in the file."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dims = {}
    for v in inferred.graph.value_info:
        shape = v.type.tensor_type.shape.dim
        if shape:
            dims[v.name] = shape[0].dim_param or shape[0].dim_value
    return inferred, dims


def test_exported_graph_keeps_the_batch_dimension_through_the_psa(tmp_path):
    """With the export forms the residual Add of every block has the input's named batch dimension, so
    onnxruntime can fuse it into the conv before it (it needs to show equal input shapes)."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    fast = optimize_for_onnxruntime(model, input_size=(3, 32, 32), batch_size=2)
    assert all(type(m) is onnx_forms.ExportPSA for m in fast.modules() if isinstance(m, PSA))
    path = tmp_path / 'm.onnx'
    export_model(fast, str(path), input_size=(3, 32, 32), check=True)
    graph, dims = _batch_dims(path)
    adds = [n.output[0] for n in graph.graph.node if n.op_type == 'Add' and n.name.endswith(('.0/Add', '.1/Add'))]
    assert adds and all(dims.get(a) == 'batch' for a in adds)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(str(path), 'onnx')(x)[0], model(x), atol=1e-4, rtol=1e-4)


def test_keep_batch_rewrites_only_reshapes_that_keep_the_batch(tmp_path):
    import onnx

    class Net(torch.nn.Module):
        def forward(self, x):  # [N, 8, 4, 4]
            a = x.reshape(-1, 2, 4, 4, 4).sum(dim=1)  # keeps the batch
            b = x.mean(dim=(2, 3)).reshape(-1, 4, 1, 1)  # [N * 2, 4, 1, 1]: the batch changes
            return a.sum(dim=(1, 2, 3)) + b.reshape(-1, 8).sum(dim=1)

    path = tmp_path / 'r.onnx'
    export_model(Net(), str(path), input_size=(8, 4, 4), check=True)  # the check runs a batch of another size
    shapes = {}
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t).tolist()
              for n in model.graph.node if n.op_type == 'Constant'}
    for n in model.graph.node:
        if n.op_type == 'Reshape':
            shapes[n.name] = inits.get(n.input[1], consts.get(n.input[1]))
    assert sorted(shapes.values()) == [[-1, 4, 1, 1], [-1, 8], [0, 2, 4, 4, 4]]
    used = {name for n in model.graph.node for name in n.input}
    assert all(t.name in used for t in model.graph.initializer)  # the replaced shape is gone
    assert all(n.output[0] in used for n in model.graph.node if n.op_type == 'Constant')


@pytest.mark.parametrize('fastest', ['depthwise', 'merged'])
@pytest.mark.parametrize('name', epsanet.MODEL_NAMES)
def test_export_forms_give_the_plain_outputs_for_every_model(monkeypatch, name, fastest):
    """ExportPSA plus every branch in the depthwise-sum or merged-group form: the plain model's outputs."""
    kinds = {'depthwise': DepthwiseSumConv2d, 'merged': GroupMergedConv2d}
    monkeypatch.setattr(onnx_forms, '_ort_ms', lambda module, x, threads, repeats=3:
                        1.0 if isinstance(module, kinds[fastest]) else 2.0)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    fast = optimize_for_onnxruntime(model, input_size=(3, 32, 32), batch_size=2)
    assert any(isinstance(m, kinds[fastest]) for m in fast.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
