"""``epsanet quantize``: an int8 ONNX file from onnxruntime's static quantization, and what it costs."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import epsanet.quantize as quantize_module
from epsanet.app.errors import ConfigError
from epsanet.cli import main
from epsanet.data import DataError, write_image_folder
from epsanet.export import export_model
from epsanet.quantize import QuantizeConfig, quantize, quantize_onnx_file

pytestmark = pytest.mark.slow


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_quantize_writes_an_int8_file_and_compares_it(trained, tmp_path):
    data, run = trained
    out = tmp_path / 'out' / 'm-int8.onnx'
    results = quantize(QuantizeConfig(checkpoint=str(run / 'best.safetensors'), data_dir=str(data), output=str(out),
                                      calibration_images=2, workers=0, speed_reps=1, speed_batch_size=2,
                                      results_file=str(tmp_path / 'r.json'), progress=False))
    assert {'QuantizeLinear', 'DequantizeLinear', 'Conv'} <= _ops(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ['m-int8.onnx']  # no temporary files left
    assert results['calibration_images'] == 2  # 3 images in train: a sample of 2
    assert results['size_mib_int8'] < results['size_mib_float32'] / 2
    assert results['eval_images'] == 6 and results['input_size'] == [3, 32, 32]
    check_int8(results, run, data, out)
    assert results['img_per_s_int8'] > 0 and results['img_per_s_float32'] > 0
    assert json.loads((tmp_path / 'r.json').read_text()) == results
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    logits = session.run(None, {session.get_inputs()[0].name: torch.randn(3, 3, 32, 32).numpy()})[0]
    assert logits.shape == (3, 3)  # the batch stays dynamic


def check_int8(results, run, data, int8_file):
    """The reported top-1s and agreement equal an independent run: the val images read with PIL and normalised by
    hand, the int8 file in a fresh onnxruntime session, the float32 weights in PyTorch. And the int8 logits follow
    the float32 ones (correlation > 0.9; measured 0.998)."""
    model = timm.create_model('epsanet50', num_classes=3).eval()
    model.load_state_dict(load_file(run / 'best.safetensors'))
    paths = sorted((data / 'val').rglob('*.png'))
    labels = np.array([['a', 'b', 'c'].index(p.parent.name) for p in paths])
    pixels = np.stack([np.asarray(Image.open(p).convert('RGB'), np.float32) / 255 for p in paths])  # 32 px: no resize
    x = ((pixels - IMAGENET_DEFAULT_MEAN) / IMAGENET_DEFAULT_STD).transpose(0, 3, 1, 2).astype(np.float32)
    session = ort.InferenceSession(str(int8_file), providers=['CPUExecutionProvider'])
    int8 = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        fp32 = model(torch.from_numpy(x)).numpy()
    assert results['top1_int8'] == round(100 * float((int8.argmax(1) == labels).mean()), 2)
    assert results['top1_float32'] == round(100 * float((fp32.argmax(1) == labels).mean()), 2)
    assert results['top1_agreement'] == round(100 * float((int8.argmax(1) == fp32.argmax(1)).mean()), 2)
    correlation = np.corrcoef(int8.ravel(), fp32.ravel())[0, 1]
    assert correlation > 0.9, f'int8 logits correlate {correlation:.3f} with float32\'s'


def test_the_int8_check_fails_on_a_broken_quantizer(trained, tmp_path, monkeypatch):
    """Calibrated on blank images (all activation ranges collapse), the int8 file is wrong: the check says so."""
    data, run = trained
    real = quantize_module.quantize_onnx_file
    monkeypatch.setattr(quantize_module, 'quantize_onnx_file', lambda path, output, calibration, *args, **kw: real(
        path, output, (torch.zeros_like(batch) for batch in calibration), *args, **kw))
    out = tmp_path / 'broken-int8.onnx'
    results = quantize(QuantizeConfig(checkpoint=str(run / 'best.safetensors'), data_dir=str(data), output=str(out),
                                      calibration_images=2, workers=0, speed_reps=0, progress=False))
    with pytest.raises(AssertionError, match='int8 logits correlate'):
        check_int8(results, run, data, out)


def test_quantized_logits_follow_the_float_model(tmp_path):
    """On the calibration distribution the int8 logits stay close to float32's (here: a small network, ranges
    calibrated on the same random inputs)."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=10, layers=(1, 1, 1, 1)).eval()
    fp32, int8 = tmp_path / 'm.onnx', tmp_path / 'm-int8.onnx'
    export_model(model, str(fp32), 'onnx', input_size=(3, 32, 32), batch_size=4)
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert quantize_onnx_file(str(fp32), str(int8), batches) == 16
    session = ort.InferenceSession(str(int8), providers=['CPUExecutionProvider'])
    x = batches[0]
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9
    assert not torch.allclose(got, expected, atol=1e-6)  # it is really quantized


def test_quantize_errors(trained, tmp_path, capsys):
    data, run = trained
    with pytest.raises(ConfigError, match='--data-dir is required'):
        quantize(QuantizeConfig(checkpoint=str(run / 'best.safetensors')))
    with pytest.raises(ConfigError, match='--calibration-images must be >= 1'):
        quantize(QuantizeConfig(data_dir=str(data), calibration_images=0))
    with pytest.raises(ConfigError, match='unknown calibration method'):
        quantize_onnx_file('m.onnx', str(tmp_path / 'x.onnx'), [], method='mse')
    fp32, previous = tmp_path / 'f.onnx', tmp_path / 'previous-int8.onnx'
    export_model(timm.create_model('epsanet50', num_classes=3, layers=(1, 1, 1, 1)), str(fp32), 'onnx',
                 input_size=(3, 32, 32), check=False)
    previous.write_bytes(b'an earlier file')
    with pytest.raises(ConfigError, match='at least one calibration image'):
        quantize_onnx_file(str(fp32), str(previous), [])
    assert previous.read_bytes() == b'an earlier file'  # refused before anything was written
    other = write_image_folder(tmp_path / 'other', classes=('a', 'b', 'x'), splits={'train': 1, 'val': 1})
    with pytest.raises(DataError, match='are not the classes'):  # before any file is written
        quantize(QuantizeConfig(checkpoint=str(run / 'best.safetensors'), data_dir=str(other),
                                output=str(tmp_path / 'o.onnx'), workers=0, progress=False))
    assert not (tmp_path / 'o.onnx').exists()
    code = main(['quantize', '--checkpoint', str(run / 'best.safetensors'), '--data-dir', str(data), '--split',
                 'nosuchsplit', '-o', str(tmp_path / 'q.onnx'), '--workers', '0', '--no-progress'])
    assert code == 2 and 'epsanet quantize: error:' in capsys.readouterr().err
    assert not (tmp_path / 'q.onnx').exists()


def test_quantize_cli(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / 'q.onnx'
    code = main(['quantize', '--checkpoint', str(run / 'best.safetensors'), '--data-dir', str(data), '-o', str(out),
                 '--calibration-images', '3', '--eval-split', '', '--speed-reps', '1', '--speed-batch-size', '2',
                 '--workers', '0', '--no-progress', '--calibrate-method', 'percentile', '--onnx-forms', 'plain'])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert 'calibrated on 3 images (percentile)' in printed and 'int8' in printed and 'top-1' not in printed
