"""``epsanet explain`` and its API (epsanet/explain.py): Grad-CAM size, PSA branch weights, the chart data."""
import numpy as np
import pytest
import timm
import torch

from epsanet.app.errors import ConfigError
from epsanet.cli import main
from epsanet.data import write_image_folder
from epsanet.explain import ExplainConfig, explain, explain_tensor, psa_modules
from epsanet.train.checkpoint import save_weights


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('epsanet50', num_classes=3).eval()


def test_heatmap_has_the_input_size_and_parameters_get_no_grad(model):
    x = torch.randn(1, 3, 48, 40)
    exp = explain_tensor(model, x)
    assert exp.cam.shape == (48, 40) and exp.cam.min() >= 0 and exp.cam.max() == pytest.approx(1.0)
    assert exp.target == int(model(x).argmax()) and exp.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert all(p.grad is None for p in model.parameters())
    other = explain_tensor(model, x, target=(exp.target + 1) % 3)
    assert other.target == (exp.target + 1) % 3 and not np.allclose(other.cam, exp.cam)
    with pytest.raises(ConfigError, match='out of range'):
        explain_tensor(model, x, target=7)


def test_branch_weights_sum_to_one_per_channel(model):
    exp = explain_tensor(model, torch.randn(1, 3, 64, 64))
    names = [n for n, _ in psa_modules(model)]
    assert len(names) == 16 and set(exp.branch_weights) == set(names)  # 3 + 4 + 6 + 3 blocks
    assert exp.kernel_sizes == [3, 5, 7, 9] and exp.stages == [1, 2, 3, 4] and exp.stage_means.shape == (4, 4)
    for name, w in exp.branch_weights.items():
        psa = model.get_submodule(name)
        assert w.shape == (4, psa.out_chs // 4)
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(exp.stage_means.sum(axis=1), 1.0, atol=1e-5)


def _favour_9x9_in_stage4(model):
    """Only the 9x9 branch of every stage-4 PSA answers (positive weights on a non-negative input, the others
    zero), and the SE turns a large pooled response into a large weight: the softmax favours 9x9."""
    with torch.no_grad():
        for block in model.layer4:
            psa = block.conv2
            for k, conv in zip(psa.kernel_sizes, psa.convs):
                conv.weight.fill_(0.01 if k == 9 else 0.0)
            psa.se.fc1.weight.fill_(0.05)
            psa.se.fc1.bias.zero_()
            psa.se.fc2.weight.fill_(1.0)
            psa.se.fc2.bias.fill_(-5.0)
    return model


def test_a_psa_favouring_9x9_shows_in_the_chart_data(tmp_path):
    torch.manual_seed(0)
    model = _favour_9x9_in_stage4(timm.create_model('epsanet50', num_classes=3))
    save_weights(tmp_path / 'w.safetensors', model.state_dict(),
                 dict(model='epsanet50', num_classes=3, classes=['x', 'y', 'z'], img_size=64))
    images = write_image_folder(tmp_path / 'img', classes=('x',), splits={'val': 1}, size=64)
    written = explain(ExplainConfig(inputs=(str(images),), checkpoint=str(tmp_path / 'w.safetensors'),
                                    output_dir=str(tmp_path / 'out'), target_class='y', progress=False))
    assert len(written) == 1 and written[0]['label'] == 'y' and written[0]['target'] == 1
    arrays = np.load(written[0]['npz'])
    ks, means = list(arrays['kernel_sizes']), arrays['stage_means']
    stage4 = list(arrays['stages']).index(4)
    assert ks[int(means[stage4].argmax())] == 9 and means[stage4][ks.index(9)] > 0.4
    assert means[stage4][ks.index(3)] < 0.25
    for name in ('layer4.0.conv2', 'layer4.2.conv2'):
        w = arrays[f'psa/{name}']
        assert (w.argmax(axis=0) == ks.index(9)).all()  # every channel
    assert arrays['cam'].shape == arrays['image'].shape[:2] == (64, 64)
    png = tmp_path / 'out' / '0.png'
    assert png.is_file() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_writes_one_png_per_image_and_skips_unreadable(tmp_path, capsys):
    images = write_image_folder(tmp_path / 'img', classes=('a',), splits={'val': 2}, size=32)
    (images / 'val' / 'a' / 'bad.png').write_bytes(b'garbage')
    code = main(['explain', str(images), '--img-size', '32', '--output-dir', str(tmp_path / 'out'), '--no-progress',
                 '--num-classes', '3'])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['0.npz', '0.png', '1.npz', '1.png']
    assert code == 0 and '-> ' in capsys.readouterr().out
    assert main(['explain', str(images), '--img-size', '32', '--output-dir', str(tmp_path / 'o2'),
                 '--target-class', 'nope', '--num-classes', '3']) == 2
    assert 'not a class name' in capsys.readouterr().err
