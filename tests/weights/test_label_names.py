"""Class names travel with the weights: ``epsanet convert`` -> config.json ``label_names`` -> timm, the Hub,
transformers and ``epsanet predict`` (epsanet/weights/convert.py)."""
import json
import warnings

import pytest
import timm
import torch

from epsanet.cli import main
from epsanet.data import write_image_folder
from epsanet.predict import PredictConfig, predict
from epsanet.train.checkpoint import save_weights
from epsanet.weights import WeightsError
from epsanet.weights.convert import convert

CLASSES = ['cat', 'dog', 'fox']
REPO = 'test-org/epsanet50-labels'


@pytest.fixture(scope='module')
def trained_file(tmp_path_factory):
    """3-class weights in the format ``epsanet train`` writes (classes recorded in the metadata)."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=3)
    path = tmp_path_factory.mktemp('labels') / 'best.safetensors'
    save_weights(path, model.state_dict(), dict(model='epsanet50', num_classes=3, classes=CLASSES, img_size=32))
    return path


@pytest.fixture(scope='module')
def labelled_dir(tmp_path_factory, trained_file):
    out = tmp_path_factory.mktemp('labelled') / 'epsanet50-labels'
    return out, convert(trained_file, out, progress=False)


def test_config_json_is_timms_layout_with_label_names(labelled_dir, trained_file, tmp_path):
    from timm.models import save_for_hf

    out, result = labelled_dir
    assert result.label_names == CLASSES
    config = json.loads((out / 'config.json').read_text())
    assert config['label_names'] == CLASSES and config['num_classes'] == 3
    assert 'num_classes' not in config.get('model_args', {})
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]  # the eval size the training recorded
    # everything else exactly as timm's own save_for_hf writes it
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    save_for_hf(model, str(tmp_path), model_config=dict(label_names=CLASSES), safe_serialization=True)
    timms = json.loads((tmp_path / 'config.json').read_text())
    timms['model_args'].pop('num_classes')
    # pretrained_cfg of a reloaded model also records its source: compare the layout there
    assert set(config['pretrained_cfg']) <= set(timms.pop('pretrained_cfg')) and config.pop('pretrained_cfg')
    assert config == timms
    assert model.pretrained_cfg['label_names'] == CLASSES
    card = (out / 'README.md').read_text()
    assert '## Classes' in card and '| 0 | cat |' in card and '| 2 | fox |' in card


def test_label_names_file_and_wrong_count(trained_file, tmp_path, capsys):
    names = tmp_path / 'names.txt'
    names.write_text('tabby\nbeagle\n\nred fox\n')
    code = main(['convert', str(trained_file), str(tmp_path / 'out'), '--label-names', str(names)])
    assert code == 0 and 'class names: tabby, beagle, red fox' in capsys.readouterr().out
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['label_names'] == ['tabby', 'beagle', 'red fox']
    with pytest.raises(WeightsError, match='list 2 classes but the weights have 3'):
        convert(trained_file, tmp_path / 'bad', progress=False, label_names=['a', 'b'])
    assert not (tmp_path / 'bad').exists()


def test_transformers_auto_model_and_pipeline(labelled_dir):
    transformers = pytest.importorskip('transformers')
    from PIL import Image

    out, _ = labelled_dir
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
        pipe = transformers.pipeline('image-classification', model=str(out))
    assert hf.config.id2label == dict(enumerate(CLASSES))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x), rtol=0, atol=1e-5)
    preds = pipe(Image.new('RGB', (40, 40), (200, 30, 30)), top_k=3)
    assert sorted(p['label'] for p in preds) == CLASSES


def test_hub_label_names_reach_timm_and_predict_offline(hub_server, offline, labelled_dir, trained_file, tmp_path,
                                                        capsys):
    out, _ = labelled_dir
    hub_server.repos[REPO] = {p.name: p.read_bytes() for p in out.iterdir()}
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # fills the Hub cache
    offline()
    hub_server.repos.clear()
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == CLASSES
    images = write_image_folder(tmp_path / 'img', classes=('x',), splits={'val': 2})
    result = predict(PredictConfig(inputs=(str(images),), checkpoint=f'hf-hub:{REPO}', workers=0, progress=False,
                                   img_size=32))
    assert result.label_source == 'checkpoint' and result.count == 2
    assert all(r['label'][0] in CLASSES for r in result.rows)
    # a converted folder works as --checkpoint too, with the recorded eval transform: the same predictions
    assert main(['predict', str(images), '--checkpoint', str(out), '-j', '0', '--no-progress']) == 0
    assert 'labels are class indices' not in capsys.readouterr().out
    from_folder = predict(PredictConfig(inputs=(str(images),), checkpoint=str(out), workers=0, progress=False))
    from_file = predict(PredictConfig(inputs=(str(images),), checkpoint=str(trained_file), workers=0, progress=False))
    assert from_folder.img_size == from_file.img_size == 32
    for a, b in zip(from_folder.rows, from_file.rows):
        assert a['label'] == b['label'] and a['prob'] == pytest.approx(b['prob'], abs=1e-5)


def test_predict_from_a_url_keeps_the_recorded_names_and_hub_errors_are_clear(file_server, hub_server, offline,
                                                                               trained_file, tmp_path, monkeypatch):
    from epsanet.app.errors import CheckpointError

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch-home'))
    file_server.files['/w/best.safetensors'] = trained_file.read_bytes()
    images = write_image_folder(tmp_path / 'img', classes=('x',), splits={'val': 1})
    result = predict(PredictConfig(inputs=(str(images),), checkpoint=f'{file_server.url}/w/best.safetensors',
                                   workers=0, progress=False))
    assert result.label_source == 'checkpoint' and result.classes == CLASSES and result.img_size == 32
    offline()
    with pytest.raises(CheckpointError, match='cannot load hf-hub:test-org/missing'):
        predict(PredictConfig(inputs=(str(images),), checkpoint='hf-hub:test-org/missing', workers=0, progress=False))
