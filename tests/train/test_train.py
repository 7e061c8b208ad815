"""End-to-end runs of :func:`epsanet.train.train` on a tiny generated ImageFolder (32 px, batch 4)."""
import collections
import logging
import math
import os
import shutil
import signal
import threading
import time

import pytest
import timm
import torch
from safetensors.torch import load_file

from epsanet.app.errors import CheckpointError, NonFiniteLossError
from epsanet.app.flags import parse_config
from epsanet.data import DataError, write_image_folder
from epsanet.data.synthetic import write_wds
from epsanet.train import Callback, Interrupted, TrainConfig, interrupt, train
from epsanet.train.checkpoint import load_state
from epsanet.weights.metadata import read_weights_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), classes=('a', 'b', 'c'), splits={'train': 4, 'val': 2})


def _cfg(data, out, **kw):
    base = dict(data_dir=str(data), output=str(out), img_size=32, batch_size=4, epochs=2, workers=0, opt='sgd',
                lr=0.01, warmup_epochs=0, sched='cosine', seed=3, progress=False, crop_pct=1.0)
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Callback):
    def __init__(self, stop_after_epoch=None, stop_at_step=None):
        self.losses, self.stop_after_epoch, self.stop_at_step = [], stop_after_epoch, stop_at_step

    def on_step(self, epoch, step, loss, lr):
        self.losses.append((epoch, step, loss))
        if self.stop_at_step == (epoch, step):
            raise KeyboardInterrupt  # what Ctrl-C does

    def on_epoch_end(self, epoch, metrics):
        if self.stop_after_epoch == epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope='module')
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    rec = Recorder()
    result = train(_cfg(data, out), callbacks=[rec])
    return result, rec.losses


def test_run_writes_checkpoints_metrics_and_plot(full_run, data):
    result, losses = full_run
    out = result.output_dir
    assert len(losses) == 2 * 3  # 12 images / batch 4, two epochs
    for name in ('last.safetensors', 'last.state.pth', 'best.safetensors', 'metrics.csv', 'metrics.json',
                 'metrics.png', 'args.yaml'):
        assert (out / name).is_file(), name
    assert (out / 'metrics.png').read_bytes()[:4] == b'\x89PNG'
    assert (out / 'metrics.csv').read_text().splitlines()[0].startswith('epoch,train_loss,lr')
    assert [r['epoch'] for r in result.metrics] == [1, 2]
    assert result.best_top1 == max(r['val_top1'] for r in result.metrics)
    meta = read_weights_metadata(out / 'best.safetensors')
    assert meta['model'] == 'epsanet50' and meta['classes'] == ['a', 'b', 'c'] and meta['img_size'] == 32
    assert meta['top1'] == result.best_top1
    # the saved weights load through timm's own pretrained path
    model = timm.create_model('epsanet50', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(out / 'last.safetensors'), num_classes=3))
    saved = load_file(out / 'last.safetensors')
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert load_state(out / 'last.state.pth')['epoch'] == 2
    # args.yaml reproduces the run as a --config file, with the settings the recipe picked (epsanet.train.recipe)
    picked = dict(scale=(1.0, 1.0), color_jitter=0.0, smoothing=0.0, sched_on_updates=False, bn_recalibrate=True,
                  weight_decay=2e-5)
    assert parse_config(TrainConfig, ['--config', str(out / 'args.yaml')]) == _cfg(data, out, **picked)


def _same_weights(a, b):
    wa, wb = load_file(a / 'last.safetensors'), load_file(b / 'last.safetensors')
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != 'train_img_per_sec'} for r in rows]


def test_resume_after_an_epoch_repeats_the_uninterrupted_run(full_run, data, tmp_path):
    result, losses = full_run
    first = Recorder(stop_after_epoch=0)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path), callbacks=[first])
    second = Recorder()
    resumed = train(_cfg(data, tmp_path, resume=str(tmp_path)), callbacks=[second])
    assert first.losses + second.losses == losses  # exactly
    assert _without_timing(resumed.metrics) == _without_timing(result.metrics)
    assert _same_weights(tmp_path, result.output_dir)


def test_resume_with_more_epochs_follows_the_longer_schedule(full_run, data, tmp_path):
    lrs = []

    class Lr(Callback):
        def on_step(self, epoch, step, loss, lr):
            lrs.append((epoch, lr))

    shutil.copytree(full_run[0].output_dir, tmp_path / 'run')
    train(_cfg(data, tmp_path / 'run', resume=str(tmp_path / 'run'), epochs=4), callbacks=[Lr()])
    # cosine over 4 epochs, per epoch: epoch 2 at 0.01 * (1 + cos(pi * 2 / 4)) / 2, not the 2-epoch schedule's end
    assert [e for e, _ in lrs] == [2, 2, 2, 3, 3, 3]
    assert lrs[0][1] == pytest.approx(0.005) and lrs[-1][1] == pytest.approx(0.01 * (1 + math.cos(math.pi * 3 / 4)) / 2)


def test_resume_at_another_image_size_says_so(full_run, data, tmp_path, caplog):
    shutil.copytree(full_run[0].output_dir, tmp_path / 'run')
    with caplog.at_level(logging.WARNING):
        train(_cfg(data, tmp_path / 'run', resume=str(tmp_path / 'run'), epochs=3, img_size=64))
    assert 'resuming at image size 64: the run trained at 32 so far (--img-size 32 resumes it' in caplog.text


def test_ctrl_c_mid_epoch_saves_the_exact_position(full_run, data, tmp_path, caplog):
    result, losses = full_run
    first = Recorder(stop_at_step=(0, 1))
    # with DataLoader workers this time: each sample's augmentation depends on (seed, epoch, sample) only, so
    # the data equal the reference's (loaded in the main process) and a resume needs no worker state
    with caplog.at_level(logging.WARNING), pytest.raises(Interrupted) as e:
        train(_cfg(data, tmp_path, workers=2), callbacks=[first])
    assert e.value.exit_code == 130 and e.value.state == tmp_path / 'last.state.pth'
    state = load_state(tmp_path / 'last.state.pth')
    assert (state['epoch'], state['step'], state['stopped_by']) == (0, 2, 'SIGINT')
    assert 'stopped by SIGINT at epoch 1, step 2 of 3' in caplog.text and '--resume auto' in caplog.text
    assert not (tmp_path / 'last.safetensors').exists()  # the weights file is written at epoch ends only
    # the position only means the same with the same batch size (or processes, or data)
    with pytest.raises(CheckpointError, match='with 1 processes x --batch-size 4 over 12 training images; this run '
                                              'has 1 x 2 over 12'):
        train(_cfg(data, tmp_path, resume='auto', batch_size=2))
    second = Recorder()
    resumed = train(_cfg(data, tmp_path, resume='auto', workers=2), callbacks=[second])
    assert first.losses + second.losses == losses  # no batch trained twice, none skipped, same randomness
    assert _without_timing(resumed.metrics) == _without_timing(result.metrics)
    assert _same_weights(tmp_path, result.output_dir)


def test_nan_loss_stops_naming_epoch_and_step(data, tmp_path):
    model = timm.create_model('epsanet50', num_classes=3)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float('nan') if len(calls) == 2 else output

    model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match='loss became nan at epoch 1, step 2.*Lower the learning rate') as e:
        train(_cfg(data, tmp_path, epochs=1), model=model)
    assert (e.value.epoch, e.value.step) == (1, 2)
    assert not (tmp_path / 'last.safetensors').exists()  # nothing NaN was saved


def test_resume_from_another_model_or_class_count(full_run, data, tmp_path):
    run = full_run[0].output_dir
    with pytest.raises(CheckpointError, match='written for epsanet50 with 3 classes, this run is epsanet50_large'):
        train(_cfg(data, tmp_path, model='epsanet50_large', resume=str(run)))
    other = write_image_folder(tmp_path / 'two', classes=('a', 'b'), splits={'train': 2, 'val': 1})
    with pytest.raises(CheckpointError, match='with 3 classes, this run is epsanet50 with 2 classes'):
        train(_cfg(other, tmp_path / 'o', resume=str(run / 'last.state.pth')))


def test_bad_data_is_a_clear_error(data, tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        train(_cfg(tmp_path / 'missing', tmp_path))
    with pytest.raises(DataError, match='fewer than one batch of 64'):
        train(_cfg(data, tmp_path, batch_size=64))
    odd = write_image_folder(tmp_path / 'odd', classes=('a', 'b'), splits={'train': 1})
    write_image_folder(tmp_path / 'odd', classes=('a', 'z'), splits={'val': 1})
    with pytest.raises(DataError, match='different classes'):
        train(_cfg(odd, tmp_path / 'run-odd'))


def test_run_options_and_corrupt_images(tmp_path):
    data = write_image_folder(tmp_path / 'd', classes=('a', 'b'), splits={'train': 4, 'val': 1})
    (data / 'train' / 'b' / '3.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    # 64 px: with --amp (bf16) on CPU, stage 4 must be larger than 1x1 (see the warning in the loop)
    result = train(_cfg(data, tmp_path / 'run', epochs=1, val_split='', amp=True, channels_last=True, img_size=64,
                        grad_checkpointing=True, clip_grad=1.0, drop_path=0.1, sched='step', opt='momentum', lr=1e-3))
    assert result.best_top1 is None and result.weights.name == 'last.safetensors'
    assert result.metrics[0]['skipped_images'] >= 1  # the broken file was skipped and counted
    assert torch.isfinite(torch.tensor(result.metrics[0]['train_loss']))
    with pytest.raises(DataError, match='(?s)1 unreadable images.*3.png'):
        train(_cfg(data, tmp_path / 'strict', strict=True))


def test_sigterm_during_a_checkpoint_write_finishes_the_write_then_stops(data, tmp_path, monkeypatch):
    # a real SIGTERM, sent by another thread while the epoch-1 state is written (the write pauses there)
    marker = tmp_path / 'paused'
    monkeypatch.setenv('EPSANET_TEST_PAUSE_AT', 'state-write:1')
    monkeypatch.setenv('EPSANET_TEST_PAUSE_FILE', str(marker))
    monkeypatch.setattr(interrupt, '_reached', collections.Counter())

    def send():
        while not marker.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()
    rec = Recorder()
    with pytest.raises(Interrupted) as e:
        train(_cfg(data, tmp_path / 'run'), callbacks=[rec])
    assert e.value.exit_code == 143 and 'stopped by SIGTERM after epoch 1' in str(e.value)
    assert max(epoch for epoch, _, _ in rec.losses) == 0  # no step of epoch 2
    state = load_state(tmp_path / 'run' / 'last.state.pth')  # the write was finished, not cut
    assert (state['epoch'], state['step']) == (1, 0)
    assert not list((tmp_path / 'run').glob('.*.tmp'))


def test_streamed_data_resumes_from_epoch_ends_and_says_so(tmp_path, caplog):
    pytest.importorskip('webdataset')
    src = write_image_folder(tmp_path / 'img', classes=('a', 'b', 'c'), splits={'train': 4})
    shards = write_wds(src / 'train', tmp_path / 'wds', 'train')
    cfg = _cfg(shards, tmp_path / 'run', dataset='wds/tiny', val_split='', checkpoint_interval=1)
    with caplog.at_level(logging.WARNING), pytest.raises(Interrupted) as e:
        train(cfg, callbacks=[Recorder(stop_at_step=(1, 0))])
    assert '--checkpoint-interval is ignored' in caplog.text
    assert 'cannot resume part-way through an epoch: epoch 2 reruns from its start' in str(e.value)
    state = load_state(tmp_path / 'run' / 'last.state.pth')
    assert (state['epoch'], state['step']) == (1, 0) and e.value.state is None  # nothing mid-epoch was written
