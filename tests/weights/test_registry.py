"""The weights registry and its timm tags: epsanet/weights/registry.py."""
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm

import epsanet  # noqa: F401
from epsanet.weights.registry import RegistryError, cfg_problems, load_registry, registered_weights, validate_entry

PROJECT_REGISTRY = Path(__file__).resolve().parents[2] / 'weights' / 'registry.json'

ENTRY = {
    'model': 'epsanet50',
    'tag': 'testtag',
    'source': {'url': 'http://127.0.0.1:1/epsanet50.safetensors'},
    'sha256': '0' * 64,
    'file_size': 123,
    'license': 'mit',
    'provenance': {'trained_by': 'a test fixture (random weights)', 'recipe': 'none', 'data': 'none'},
    'metrics': {'top1': 0.1, 'top5': 0.5, 'img_size': 64, 'crop_pct': 1.0},
}


def test_project_registry_is_valid_and_lists_no_invented_weights():
    data = json.loads(PROJECT_REGISTRY.read_text())
    assert data['schema_version'] == 1
    entries = load_registry(PROJECT_REGISTRY)
    # The authors never published weights and this project has trained none: the registry must be empty
    # until someone adds an entry for a real, published, evaluated file.
    assert entries == []
    assert registered_weights() == ()
    assert timm.list_models('epsanet*', pretrained=True) == []


def test_entry_gives_its_timm_cfg():
    entry = validate_entry(ENTRY)
    assert entry.name == 'epsanet50.testtag'
    cfg = entry.pretrained_cfg()
    assert cfg['url'] == ENTRY['source']['url'] and cfg['input_size'] == (3, 64, 64) and cfg['crop_pct'] == 1.0
    hub = validate_entry({**ENTRY, 'source': {'hf_hub_id': 'org/repo', 'filename': 'model.safetensors',
                                              'revision': 'b' * 40}}).pretrained_cfg()
    assert hub['hf_hub_id'] == 'org/repo@' + 'b' * 40 and hub['hf_hub_filename'] == 'model.safetensors'
    assert 'url' not in hub


def test_timm_cfgs_and_registry_agree():
    assert cfg_problems() == []  # the project's: no weights on either side
    problems = cfg_problems([validate_entry(ENTRY)])
    assert len(problems) == 1 and 'epsanet50.testtag is in the registry but has no cfg' in problems[0]
    assert "_cfg(**{'num_classes': 1000" in problems[0]  # says which line to add


def test_a_broken_registry_does_not_break_import(tmp_path):
    broken = tmp_path / 'registry.json'
    broken.write_text('{"weights": [')
    env = dict(os.environ, EPSANET_WEIGHTS_REGISTRY=str(broken))
    code = ('import timm, epsanet\n'
            'm = timm.create_model("epsanet50", num_classes=2)\n'
            'from epsanet.weights import registered_weights\n'
            'registered_weights()\n')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert 'RegistryError' in out.stderr and 'is not valid JSON' in out.stderr and str(broken) in out.stderr
    assert 'create_model' not in out.stderr.split('Traceback')[-1].splitlines()[-1]


@pytest.mark.parametrize('change, message', [
    (dict(sha256='abc'), 'sha256 must be 64'),
    (dict(model='resnet50'), 'is not one of'),
    (dict(tag='In1K'), 'tag'),
    (dict(source={'url': 'u', 'hf_hub_id': 'o/r'}), 'source must be'),
    (dict(source={'hf_hub_id': 'o/r'}), 'needs "filename"'),
    (dict(metrics={'top1': 1.0}), 'metrics needs'),
    (dict(provenance={'trained_by': 'x'}), 'provenance needs'),
    (dict(license=''), 'missing field'),
])
def test_malformed_entries_name_the_field(change, message, tmp_path):
    path = tmp_path / 'registry.json'
    path.write_text(json.dumps({'schema_version': 1, 'weights': [{**copy.deepcopy(ENTRY), **change}]}))
    with pytest.raises(RegistryError, match=message) as info:
        load_registry(path)
    assert 'entry 0' in str(info.value) and str(path) in str(info.value)


def test_duplicates_and_bad_files_are_reported(tmp_path):
    path = tmp_path / 'registry.json'
    path.write_text(json.dumps({'weights': [ENTRY, ENTRY]}))
    with pytest.raises(RegistryError, match='more than once'):
        load_registry(path)
    path.write_text('{"weights": [')
    with pytest.raises(RegistryError, match='not valid JSON'):
        load_registry(path)
    with pytest.raises(RegistryError, match='does not exist'):
        load_registry(tmp_path / 'missing.json')


_CHILD = '''
import json, sys, timm, torch
from timm.models import generate_default_cfgs, register_model
import epsanet
from epsanet.models import epsanet as model_file
from epsanet.reference import create_reference
from epsanet.weights import registered_weights
name = sys.argv[1]
# what adding the weights to the model file does: a cfg line in default_cfgs (first tag: the default)
entry = registered_weights()[0]
model_file.default_cfgs = generate_default_cfgs({entry.name: model_file._cfg(**entry.pretrained_cfg())})
register_model(model_file.epsanet50)
model = timm.create_model(name, pretrained=True).eval()
default = timm.create_model('epsanet50', pretrained=True).eval()
torch.manual_seed(0)
ref = create_reference('epsanet50').eval()
x = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    diff = float((model(x) - ref(x)).abs().max())
    same = bool(torch.equal(model.fc.weight, default.fc.weight))
print(json.dumps(dict(diff=diff, same=same, listed=timm.list_models('epsanet*', pretrained=True),
                      cfg_url=model.pretrained_cfg.get('url'), license=model.pretrained_cfg.get('license'))))
'''


@pytest.mark.slow
def test_a_registry_entry_makes_the_timm_tag_work(tmp_path, file_server, small_reference, authors_file):
    """End to end in a fresh process: cfg in default_cfgs + registry entry -> tag -> loopback download ->
    sha256 -> same logits."""
    model = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    weights = tmp_path / 'epsanet50_test.safetensors'
    safetensors.torch.save_file(model.state_dict(), weights)
    data = weights.read_bytes()
    file_server.files['/epsanet50_test.safetensors'] = data
    entry = {**ENTRY, 'source': {'url': file_server.url + '/epsanet50_test.safetensors'},
             'sha256': hashlib.sha256(data).hexdigest(), 'file_size': len(data)}
    registry = tmp_path / 'registry.json'
    registry.write_text(json.dumps({'schema_version': 1, 'weights': [entry]}))
    env = dict(os.environ, EPSANET_WEIGHTS_REGISTRY=str(registry), TORCH_HOME=str(tmp_path / 'torch'))
    env.pop('HF_HUB_OFFLINE', None)
    out = subprocess.run([sys.executable, '-c', _CHILD, 'epsanet50.testtag'], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['diff'] < 1e-4  # the reference network seeded like the weights: same logits
    assert result['same']  # the registered tag is the model's default
    assert result['listed'] == ['epsanet50.testtag']
    assert result['cfg_url'] == entry['source']['url'] and result['license'] == 'mit'
    assert len([r for r in file_server.requests if r[0] == 'GET']) == 1  # second create used the cache


def test_package_registry_is_the_project_registry(monkeypatch):
    """epsanet/weights/registry.json (shipped in wheels) is the top-level weights/registry.json."""
    from pathlib import Path

    from epsanet.weights.registry import ENV_VAR, registry_path

    monkeypatch.delenv(ENV_VAR, raising=False)
    top_level = Path(__file__).resolve().parents[2] / 'weights' / 'registry.json'
    assert registry_path().read_bytes() == top_level.read_bytes()
