"""``push``: publishing a converted folder and drafting its registry entry: epsanet/weights/publish.py.

The Hub API is replaced by a recorder: uploading needs a real Hub account. What is tested is what
``push`` asks huggingface_hub to do, the checks before it, and the entry it prints.
"""
import json
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import LocalTokenNotFoundError

from epsanet.weights import WeightsError
from epsanet.weights.loading import sha256_file
from epsanet.weights.publish import push, registry_entry_problems

COMMIT = 'c' * 40


def make_folder(path, metrics=None, tag='in1k'):
    """A small folder with the layout ``epsanet convert`` writes."""
    path.mkdir()
    safetensors.torch.save_file({'fc.weight': torch.zeros(2, 2)}, path / 'model.safetensors')
    sha = sha256_file(path / 'model.safetensors')
    (path / 'config.json').write_text('{"architecture": "epsanet50"}')
    (path / 'README.md').write_text('card')
    (path / 'model.safetensors.sha256').write_text(f'{sha}  model.safetensors\n')
    entry = {'model': 'epsanet50', 'tag': tag, 'source': None, 'sha256': sha,
             'file_size': (path / 'model.safetensors').stat().st_size, 'num_classes': 1000, 'license': 'mit',
             'provenance': {'trained_by': 'x', 'recipe': 'y', 'data': 'z'}, 'metrics': metrics}
    (path / 'registry_entry.json').write_text(json.dumps(entry))
    return path


class RecordingApi:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(('create_repo', repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(('create_branch', repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(('upload_folder', kw['repo_id'], kw))
        return SimpleNamespace(oid=COMMIT, commit_url=f'https://hub.example/{kw["repo_id"]}/commit/{COMMIT}')


def test_push_uploads_and_pins_the_entry_to_the_commit(tmp_path):
    folder = make_folder(tmp_path / 'out', metrics={'top1': 1.0, 'top5': 2.0, 'img_size': 224, 'crop_pct': 0.875})
    api = RecordingApi()
    result = push(folder, 'org/epsanet50', private=True, revision='v1', api=api)
    assert [c[0] for c in api.calls] == ['create_repo', 'create_branch', 'upload_folder']
    assert api.calls[0][2]['private'] is True and api.calls[1][2]['branch'] == 'v1'
    upload = api.calls[2][2]
    assert upload['folder_path'] == str(folder) and upload['revision'] == 'v1'
    assert result.entry['source'] == {'hf_hub_id': 'org/epsanet50', 'filename': 'model.safetensors',
                                      'revision': COMMIT}
    assert result.problems == []  # a complete, valid registry entry


def test_entry_without_metrics_is_flagged(tmp_path):
    result = push(make_folder(tmp_path / 'out'), 'org/r', api=RecordingApi())
    assert result.problems and 'metrics' in result.problems[0]
    assert registry_entry_problems(result.entry) == result.problems


def test_modified_folder_is_refused_before_any_upload(tmp_path):
    folder = make_folder(tmp_path / 'out')
    safetensors.torch.save_file({'fc.weight': torch.ones(2, 2)}, folder / 'model.safetensors')
    api = RecordingApi()
    with pytest.raises(WeightsError, match='changed since it was converted'):
        push(folder, 'org/r', api=api)
    assert api.calls == []
    with pytest.raises(WeightsError, match='epsanet convert'):
        push(tmp_path, 'org/r', api=api)


def test_missing_token_says_how_to_log_in(tmp_path):
    with pytest.raises(WeightsError, match='hf auth login'):
        push(make_folder(tmp_path / 'out'), 'org/r', api=RecordingApi(fail=LocalTokenNotFoundError('no token')))
