import argparse
import errno
import os

import pytest
import timm
import torch

import epsanet  # noqa: F401
from epsanet.app.errors import CheckpointError
from epsanet.train import checkpoint as ckpt
from epsanet.weights.metadata import read_weights_metadata


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / 'last.safetensors'
    ckpt.save_weights(path, {'w': torch.ones(3)}, dict(epoch=1))
    before = path.read_bytes()

    def half_write_then_fail(filename, data):
        with open(filename, 'wb') as f:
            f.write(data[:7])
        _disk_full()

    monkeypatch.setattr(ckpt, '_write_bytes', half_write_then_fail)
    with pytest.raises(CheckpointError, match='disk is full; the previous version of it is intact'):
        ckpt.save_weights(path, {'w': torch.zeros(3)}, dict(epoch=2))
    assert path.read_bytes() == before
    assert read_weights_metadata(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.safetensors']  # no temporary file left


def test_full_disk_on_state_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.state.pth'
    ckpt.save_state(path, dict(epoch=1, optimizer={}))
    monkeypatch.setattr(ckpt.torch, 'save', _disk_full)
    with pytest.raises(CheckpointError, match='disk is full'):
        ckpt.save_state(path, dict(epoch=2, optimizer={}))
    assert ckpt.load_state(path)['epoch'] == 1


def test_state_is_read_without_unpickling_objects(tmp_path):
    path = tmp_path / 'evil.state.pth'
    torch.save(dict(epoch=1, optimizer={}, payload=argparse.Namespace(x=1)), path)  # an arbitrary object
    with pytest.raises(CheckpointError, match='cannot read training state'):
        ckpt.load_state(path)
    torch.save({'just': torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match='not a training state'):
        ckpt.load_state(path)


def test_resolve_resume(tmp_path):
    with pytest.raises(CheckpointError, match='last.state.pth does not exist'):
        ckpt.resolve_resume(tmp_path)
    (tmp_path / 'last.state.pth').write_bytes(b'')
    files = ckpt.resolve_resume(tmp_path)  # the state holds the weights: the .safetensors is not needed
    assert files == dict(state=tmp_path / 'last.state.pth', weights=tmp_path / 'last.safetensors')
    assert ckpt.resolve_resume(tmp_path / 'last.safetensors') == files
    with pytest.raises(CheckpointError, match='expects a run folder'):
        ckpt.resolve_resume(tmp_path / 'model.bin')


def test_latest_state_is_the_newest_readable_one(tmp_path):
    assert ckpt.latest_state(tmp_path / 'missing') is None
    assert ckpt.latest_state(tmp_path) is None
    ckpt.save_state(tmp_path / 'old.state.pth', dict(epoch=1, optimizer={}))
    ckpt.save_state(tmp_path / 'last.state.pth', dict(epoch=2, optimizer={}))
    os.utime(tmp_path / 'old.state.pth', (1, 1))
    assert ckpt.latest_state(tmp_path) == tmp_path / 'last.state.pth'
    (tmp_path / 'last.state.pth').write_bytes(b'truncated')  # unreadable: skipped with a warning
    assert ckpt.latest_state(tmp_path) == tmp_path / 'old.state.pth'


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    ckpt.save_state(tmp_path / 'last.state.pth', dict(epoch=1, optimizer={}))
    (tmp_path / '.last.state.pth.abc123.tmp').write_bytes(b'half')
    (tmp_path / '.last.safetensors.x.tmp').write_bytes(b'half')
    (tmp_path / '.mine.tmp').write_bytes(b'not ours')
    assert ckpt.remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.mine.tmp', 'last.state.pth']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=5).eval()
    path = tmp_path_factory.mktemp('w') / 'best.safetensors'
    ckpt.save_weights(path, model.state_dict(), dict(model='epsanet50', num_classes=5))
    return model, path


def test_weights_load_through_timm(saved):
    model, path = saved
    reloaded = timm.create_model('epsanet50', pretrained=True, num_classes=5,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert read_weights_metadata(path) == dict(model='epsanet50', num_classes=5)
