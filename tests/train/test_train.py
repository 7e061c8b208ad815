"""End-to-end runs of :func:`epsanet.train.train` on a tiny generated ImageFolder (32 px, batch 4)."""
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

from epsanet.data import DataError, write_image_folder
from epsanet.train import (
    Callback,
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    parse_config,
    read_weights_metadata,
    train,
)
from epsanet.train.checkpoint import load_state

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
    picked = dict(scale=(1.0, 1.0), color_jitter=0.0, smoothing=0.0, sched_on_updates=False, bn_recalibrate=True)
    assert parse_config(TrainConfig, ['--config', str(out / 'args.yaml')]) == _cfg(data, out, **picked)


def test_resume_repeats_the_uninterrupted_losses(full_run, data, tmp_path):
    _, losses = full_run
    first = Recorder(stop_after_epoch=0)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path), callbacks=[first])
    second = Recorder()
    result = train(_cfg(data, tmp_path, resume=str(tmp_path)), callbacks=[second])
    assert [x[:2] for x in first.losses + second.losses] == [x[:2] for x in losses]
    resumed = [x[2] for x in first.losses + second.losses]
    assert resumed == pytest.approx([x[2] for x in losses], rel=1e-5, abs=1e-6)
    assert [r['epoch'] for r in result.metrics] == [1, 2]


def test_ctrl_c_mid_epoch_saves_and_says_how_to_resume(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path, epochs=1), callbacks=[Recorder(stop_at_step=(0, 1))])
    state = load_state(tmp_path / 'last.state.pth')
    assert state['epoch'] == 0 and state['interrupted'] == dict(epoch=1, step=2)
    assert 'interrupted at epoch 1, step 2' in caplog.text and '--resume' in caplog.text


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
        train(_cfg(odd, tmp_path))


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
