import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import epsanet.export as export_mod
from epsanet.cli import main
from epsanet.export import ExportError, export_model, load_exported

SIZE = (3, 32, 32)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('epsanet50', num_classes=10).eval()


@pytest.fixture(scope='module')
def small():
    """EPSANet-50's blocks, one per stage: every layer type of the network, a third of the weights."""
    torch.manual_seed(0)
    return timm.create_model('epsanet50', num_classes=10, layers=(1, 1, 1, 1)).eval()


def _assert_matches(model, run, batch_size, atol=1e-4):
    x = torch.randn(batch_size, *SIZE)
    with torch.no_grad():
        expected = model(x)
    got = run(x)[0]
    assert got.shape == expected.shape
    assert expected.abs().max() > 1e-3  # a meaningful comparison, not two zero tensors
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_onnx_dynamic_batch_matches_pytorch(model, tmp_path):
    path = tmp_path / 'epsanet50.onnx'
    result = export_model(model, str(path), 'onnx', input_size=SIZE, batch_size=2, opset=17)
    assert result.max_abs_diff <= 1e-4 and result.check_batch_size == 3
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 5):  # other batch sizes than the exported one, straight through onnxruntime
        _assert_matches(model, lambda x: [torch.from_numpy(session.run(None, {'input': x.numpy()})[0])], batch)
    assert [p.name for p in tmp_path.iterdir()] == ['epsanet50.onnx']  # no temp file left


def test_onnx_static_batch(small, tmp_path):
    path = tmp_path / 'static.onnx'
    result = export_model(small, str(path), 'onnx', input_size=SIZE, batch_size=2, dynamic_batch=False)
    assert result.check_batch_size == 2
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2



@pytest.mark.parametrize('method', ['script', 'trace'])
def test_torchscript_matches_pytorch(small, tmp_path, method):
    path = tmp_path / f'{method}.pt'
    result = export_model(small, str(path), 'torchscript', input_size=SIZE, method=method)
    assert result.max_abs_diff <= 1e-4
    _assert_matches(small, load_exported(str(path), 'torchscript'), 4)


def test_exported_program_dynamic_batch_matches_pytorch(small, tmp_path):
    path = tmp_path / 'epsanet50.pt2'
    result = export_model(small, str(path), 'exported-program', input_size=SIZE)
    assert result.max_abs_diff <= 1e-4
    run = load_exported(str(path), 'exported-program')
    for batch in (1, 4):
        _assert_matches(small, run, batch)


def test_export_features_only_model(tmp_path):
    """Models returning a list of tensors (timm features_only) export with one ONNX output per stage."""
    model = timm.create_model('epsanet50', features_only=True, out_indices=(3, 4), layers=(1, 1, 1, 1))
    result = export_model(model, str(tmp_path / 'features.onnx'), 'onnx', input_size=SIZE)
    assert result.max_abs_diff <= 1e-4
    outputs = load_exported(str(tmp_path / 'features.onnx'), 'onnx')(torch.randn(3, *SIZE))
    assert [tuple(o.shape) for o in outputs] == [(3, 1024, 2, 2), (3, 2048, 1, 1)]


@pytest.mark.parametrize('fmt, name', [
    ('onnx', 'm.onnx'),
    pytest.param('exported-program', 'm.pt2', marks=pytest.mark.slow),
    pytest.param('torchscript', 'm.pt', marks=pytest.mark.slow)])
def test_large_model_exports(tmp_path, fmt, name):
    """EPSANet Large takes the split-input PSA path (torch.chunk)."""
    model = timm.create_model('epsanet50_large', num_classes=10, layers=(1, 1, 1, 1))
    result = export_model(model, str(tmp_path / name), fmt, input_size=SIZE)
    assert result.max_abs_diff <= 1e-4


def test_check_rejects_a_wrong_file_and_writes_nothing(small, tmp_path, monkeypatch):
    real = export_mod.load_exported

    def perturbed(path, fmt):
        run = real(path, fmt)
        return lambda x: [o + 1e-3 for o in run(x)]

    monkeypatch.setattr(export_mod, 'load_exported', perturbed)
    path = tmp_path / 'bad.pt'
    with pytest.raises(ExportError, match='differs from PyTorch'):
        export_model(small, str(path), 'torchscript', input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_check_tolerance_scales_with_the_outputs(small, tmp_path, monkeypatch):
    """float32 rounding is relative: logits in the thousands may differ by more than atol and still pass, by
    atol + rtol * max|output|; the same relative error on small outputs stays within atol."""
    real = export_mod.load_exported

    def rounded(path, fmt):
        run = real(path, fmt)
        return lambda x: [o * (1 + 2e-6) for o in run(x)]

    monkeypatch.setattr(export_mod, 'load_exported', rounded)
    large = torch.nn.Sequential(small, ScaleBy(1e4)).eval()
    result = export_model(large, str(tmp_path / 'large.pt'), 'torchscript', input_size=SIZE)
    assert 1e-4 < result.max_abs_diff <= 1e-4 + 1e-5 * 1e4 * 10
    with pytest.raises(ExportError, match=r'atol \+ rtol'):
        export_model(large, str(tmp_path / 'strict.pt'), 'torchscript', input_size=SIZE, rtol=0)
    assert not (tmp_path / 'strict.pt').exists()


class ScaleBy(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_export_argument_errors(small, tmp_path):
    with pytest.raises(ValueError, match='Unknown export format'):
        export_model(small, str(tmp_path / 'm.x'), 'tflite', input_size=SIZE)
    with pytest.raises(ValueError, match='must end in .pt2'):
        export_model(small, str(tmp_path / 'm.pt'), 'exported-program', input_size=SIZE)
    with pytest.raises(ValueError, match='channels, height, width'):
        export_model(small, str(tmp_path / 'm.onnx'), 'onnx', input_size=(32, 32))

    class DictOut(torch.nn.Module):
        def forward(self, x):
            return {'y': x}

    with pytest.raises(ExportError, match='tensor or a list/tuple'):
        export_model(DictOut(), str(tmp_path / 'd.onnx'), 'onnx', input_size=SIZE)


def test_cli_export_loads_weights(model, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / 'sub' / 'w.onnx'
    rc = main(['export', '--format', 'onnx', '--weights', str(weights), '--num-classes', '10',
               '--img-size', '32', '-o', str(out), '--no-check'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'dynamic batch' in printed and 'max |diff|' not in printed  # --no-check skips the check
    _assert_matches(model, load_exported(str(out), 'onnx'), 3)  # the file holds the given weights


def test_cli_export_refuses_a_num_classes_the_weights_do_not_have(model, tmp_path, capsys):
    """A wrong --num-classes would otherwise drop the trained classifier for a random one, and the export
    check (against the same random model) would pass."""
    from safetensors.torch import save_file

    weights = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / 'w.onnx'
    rc = main(['export', '--format', 'onnx', '--weights', str(weights), '--num-classes', '2',
               '--img-size', '32', '-o', str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and '--num-classes 2 does not fit' in err and 'has 10 classes' in err
    assert not out.exists()


def test_cli_export_errors(tmp_path, capsys):
    assert main(['export', 'not_a_model', '-o', str(tmp_path / 'x.onnx')]) == 2
    assert 'Unknown model' in capsys.readouterr().err
    assert main(['export', '--weights', str(tmp_path / 'missing.pth')]) == 2
    assert 'neither an existing file' in capsys.readouterr().err
    assert main(['export', '--format', 'exported-program', '-o', str(tmp_path / 'x.onnx')]) == 2
    assert '.pt2' in capsys.readouterr().err
