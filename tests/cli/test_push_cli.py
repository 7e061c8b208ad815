"""``epsanet push``: epsanet/cli/push.py (the Hub API is replaced by a recorder)."""
import json
from types import SimpleNamespace

import huggingface_hub
import safetensors.torch
import torch

from epsanet.cli import main
from epsanet.weights.loading import sha256_file

COMMIT = 'c' * 40


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(('create_repo', repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(('upload_folder', kw['repo_id'], kw))
        return SimpleNamespace(oid=COMMIT, commit_url=f'https://hub.example/{kw["repo_id"]}/commit/{COMMIT}')


def _converted_folder(path):
    path.mkdir()
    safetensors.torch.save_file({'fc.weight': torch.zeros(2, 2)}, path / 'model.safetensors')
    for name in ('config.json', 'README.md'):
        (path / name).write_text('{}')
    entry = {'model': 'epsanet50', 'tag': None, 'source': None, 'sha256': sha256_file(path / 'model.safetensors'),
             'file_size': 1, 'license': 'mit', 'provenance': {}, 'metrics': None}
    (path / 'registry_entry.json').write_text(json.dumps(entry))
    return path


def test_push_prints_the_registry_entry(tmp_path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, 'HfApi', lambda token=None: api)
    folder = _converted_folder(tmp_path / 'out')
    assert main(['push', str(folder), 'org/epsanet50', '--private', '--tag', 'ft_digits']) == 0
    assert api.calls[0] == ('create_repo', 'org/epsanet50', {'repo_type': 'model', 'private': True, 'exist_ok': True})
    out = capsys.readouterr().out
    entry = json.loads(out[out.index('{'):out.rindex('}') + 1])
    assert entry['tag'] == 'ft_digits' and entry['source']['revision'] == COMMIT
    assert 'complete:' in out  # provenance and metrics are missing: the entry is flagged, not invented


def test_push_errors_are_one_line(tmp_path, capsys):
    assert main(['push', str(tmp_path), 'org/r']) == 2
    err = capsys.readouterr().err
    assert err.startswith('epsanet push: error:') and 'epsanet convert' in err
