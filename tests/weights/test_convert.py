"""``convert``: the authors' checkpoint -> Hub-ready folder -> timm, same logits: epsanet/weights/convert.py."""
import hashlib
import json

import pytest
import timm
import torch

import epsanet
from epsanet.weights import WeightsError
from epsanet.weights.convert import convert, infer_architecture


def _logits(model, image):
    with torch.no_grad():
        return model.eval()(image)


def test_round_trip_gives_the_reference_logits(converted_dir, image, reference_logits):
    out, result = converted_dir
    assert sorted(p.name for p in out.iterdir()) == [
        'README.md', 'config.json', 'model.safetensors', 'model.safetensors.sha256', 'registry_entry.json']
    assert result.model == 'epsanet50' and result.num_classes == 1000 and result.max_abs_diff <= 1e-5
    # the folder loads through timm's own local-dir and file mechanisms
    for model in (timm.create_model(f'local-dir:{out}', pretrained=True),
                  timm.create_model('epsanet50', pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))):
        torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)


def test_folder_contents(converted_dir):
    out, result = converted_dir
    sha = hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()
    assert result.sha256 == sha
    assert (out / 'model.safetensors.sha256').read_text() == f'{sha}  model.safetensors\n'
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'epsanet50' and config['num_classes'] == 1000
    assert config['pretrained_cfg']['tag'] == 'test' and config['pretrained_cfg']['license'] == 'mit'
    entry = json.loads((out / 'registry_entry.json').read_text())
    assert entry['sha256'] == sha and entry['file_size'] == (out / 'model.safetensors').stat().st_size
    assert entry['source'] is None and entry['metrics'] is None  # nothing invented
    card = (out / 'README.md').read_text()
    assert '22,561,715' in card and '| 3.62 |' in card and sha in card
    assert 'arch epsanet50, epoch 120' in card  # provenance read from the authors' checkpoint
    assert 'have not been evaluated' in card
    assert 'timm.create_model("hf-hub:' in card


def test_wrong_model_lists_mismatches_and_writes_nothing(tmp_path, authors_file):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match='shape mismatches'):
        convert(authors_file, out, 'epsanet50_large', progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder is left


def test_non_empty_output_folder_is_refused(tmp_path, authors_file):
    (tmp_path / 'keep.txt').write_text('x')
    with pytest.raises(WeightsError, match='not empty'):
        convert(authors_file, tmp_path, progress=False)


@pytest.mark.parametrize('name', epsanet.MODEL_NAMES)
def test_infer_architecture(name):
    with torch.device('meta'):
        sd = timm.create_model(name).state_dict()
    assert infer_architecture(sd) == name
    assert infer_architecture({f'module.{k}': v for k, v in sd.items()}) == name


def test_infer_architecture_of_the_authors_keys(small_reference):
    assert infer_architecture(small_reference.state_dict()) == 'epsanet50'
    assert infer_architecture({'fc.weight': torch.zeros(2, 2)}) is None
