"""Which training settings :mod:`epsanet.train.recipe` picks for which data, and that given values win."""
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from epsanet.app.flags import parse_config
from epsanet.data import write_image_folder
from epsanet.train import Callback, TrainConfig, train
from epsanet.train.recipe import (
    AUTO_FIELDS,
    MIN_STEPS_PER_EPOCH,
    STEP_FIELDS,
    DataSummary,
    apply_recipe,
    model_img_size,
    pick_recipe,
    pick_schedule,
    summarize,
)

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
LOGGER = 'epsanet.train.loop'


def test_small_grey_low_resolution():
    values, why = pick_recipe(DataSummary(num_images=150, num_classes=3, grey=True), img_size=48, epochs=12)
    assert values == dict(scale=(1.0, 1.0), color_jitter=0.0, crop_pct=1.0, smoothing=0.0, warmup_epochs=0,
                          sched_on_updates=False, bn_recalibrate=True)
    assert len(why) == len(AUTO_FIELDS) and 'grey' in why[1] and '48 px' in why[2]


def test_small_colour_at_224_keeps_the_models_eval_crop():
    values, _ = pick_recipe(DataSummary(num_images=2000, num_classes=5, grey=False), img_size=224, epochs=30)
    assert values == dict(scale=(1.0, 1.0), color_jitter=0.0, crop_pct=None, smoothing=0.0, warmup_epochs=0,
                          sched_on_updates=False, bn_recalibrate=True)


def test_large_colour_set_gets_timms_imagenet_augmentation():
    values, _ = pick_recipe(DataSummary(num_images=1_281_167, num_classes=1000, grey=False), img_size=224, epochs=300)
    assert values == dict(scale=(0.08, 1.0), color_jitter=0.4, crop_pct=None, smoothing=0.1, warmup_epochs=5,
                          sched_on_updates=True, bn_recalibrate=False)
    grey, _ = pick_recipe(DataSummary(num_images=50_000, num_classes=10, grey=True), img_size=224, epochs=300)
    assert grey['color_jitter'] == 0.0 and grey['scale'] == (0.08, 1.0)


@pytest.mark.parametrize('epochs, warmup', [(1, 1), (6, 1), (12, 2), (30, 3), (300, 5)])
def test_warmup_is_a_tenth_of_the_epochs_on_large_sets(epochs, warmup):
    values, _ = pick_recipe(DataSummary(20_000, 2, False), img_size=32, epochs=epochs)
    assert values['warmup_epochs'] == warmup and values['sched_on_updates'] is True
    assert pick_recipe(DataSummary(9_999, 2, False), img_size=32, epochs=epochs)[0]['warmup_epochs'] == 0


def test_given_values_win_and_the_line_names_only_what_was_picked():
    data = DataSummary(num_images=150, num_classes=3, grey=True)
    cfg, line, warning = apply_recipe(TrainConfig(epochs=12, scale=(0.08, 1.0), smoothing=0.2, warmup_epochs=3),
                                      data, img_size=32)
    assert cfg.scale == (0.08, 1.0) and cfg.smoothing == 0.2 and cfg.warmup_epochs == 3  # given
    assert (cfg.color_jitter, cfg.crop_pct, cfg.sched_on_updates) == (0.0, 1.0, True)  # picked, for the given warm-up
    assert line.startswith('recipe for 150 grey images, 3 classes, 32 px: --opt adamw (150 images < 10000), weight '
                           'decay 0.05 (decoupled, as the AdamW and LAMB recipes), batch 14 (')
    assert 'no colour jitter (grey images)' in line and line.count('\n') == 0
    assert 'Set --opt --weight-decay --batch-size --lr --color-jitter --crop-pct --sched-on-updates' in line
    assert 'random crop' not in line and 'smoothing' not in line and 'warm-up epoch' not in line
    assert 'The run: 12 epochs x 10 steps = 120 optimizer steps.' in line and '--epochs' not in line
    assert not warning


def test_flags_and_config_files_win(tmp_path):
    data = DataSummary(num_images=150, num_classes=3, grey=True)
    cfg = parse_config(TrainConfig, ['--data-dir', 'x', '--color-jitter', '0.3', '--crop-pct', '0.9'])
    cfg, _, _ = apply_recipe(cfg, data, img_size=32)
    assert (cfg.color_jitter, cfg.crop_pct, cfg.scale) == (0.3, 0.9, (1.0, 1.0))
    path = tmp_path / 'c.yaml'
    path.write_text('scale: [0.2, 1.0]\nwarmup_epochs: 0\n')
    cfg, _, _ = apply_recipe(parse_config(TrainConfig, ['--config', str(path)]), data, img_size=32)
    assert cfg.scale == (0.2, 1.0) and cfg.warmup_epochs == 0


def test_no_warmup_keeps_the_lr_per_epoch():
    values, why = pick_recipe(DataSummary(100, 2, False), img_size=32, epochs=12, warmup_epochs=0)
    assert values['sched_on_updates'] is False and why[-2] == 'lr updated every epoch'
    cfg = parse_config(TrainConfig, ['--warmup-epochs', '3', '--no-sched-on-updates'])
    assert apply_recipe(cfg, DataSummary(100, 2, False), img_size=32)[0].sched_on_updates is False


# images, processes -> batch, steps per epoch, epochs (500 steps below 20k images, 10k below 500k, else 20k; <= 300)
@pytest.mark.parametrize('images, world, batch, steps, epochs', [
    (3, 1, 3, 1, 300),  # fewer than the smallest batch: all of it, one step; 500 steps would be 500 epochs
    (64, 1, 8, 8, 63),  # the smallest batch the recipe uses, though it gives fewer than 10 steps
    (96, 1, 8, 12, 42),  # 9 would give 10 steps, but the batch is even
    (144, 1, 14, 10, 50),  # the set: 10 steps per epoch, 50 epochs, not 1 step and 300 epochs
    (300, 2, 14, 10, 50),  # per process: 150 images each
    (1000, 1, 100, 10, 50),
    (19_999, 1, 128, 156, 4),  # timm's batch once the data give enough steps with it
    (20_000, 1, 128, 156, 65),
    (1_281_167, 8, 128, 1251, 16),
])
def test_the_batch_gives_enough_steps_and_the_epochs_a_step_budget(images, world, batch, steps, epochs):
    sched = pick_schedule(images, world_size=world)
    assert (sched.batch_size, sched.steps_per_epoch, sched.epochs) == (batch, steps, epochs)
    assert sched.batch_size % 2 == 0 or sched.batch_size == images
    assert sched.total_steps >= min(500, 300 * steps) and not sched.warning
    assert set(sched.why) == set(STEP_FIELDS)


# images, processes, given epochs -> batch: the step budget (500) within the given epochs, down to batch 16
@pytest.mark.parametrize('images, world, epochs, batch', [
    (260, 1, 12, 16),  # 26 would give 10 steps per epoch, 120 in all; 16 gives 192
    (150, 1, 12, 14),  # 16 would leave fewer than 10 steps per epoch
    (64, 1, 12, 8),  # the smallest batch the recipe uses
    (5_000, 1, 10, 100),  # 50 steps per epoch: 500 in 10 epochs
    (5_000, 1, 1_000, 128),
    (1_281_167, 8, 100, 128),
])
def test_given_epochs_shrink_the_batch_towards_the_step_budget(images, world, epochs, batch):
    sched = pick_schedule(images, world_size=world, epochs=epochs)
    assert sched.batch_size == batch and sched.epochs == epochs and set(sched.why) == {
        'opt', 'weight_decay', 'batch_size', 'lr'}
    assert sched.total_steps >= 500 or sched.batch_size <= 16


@pytest.mark.parametrize('images, opt', [(9_999, 'adamw'), (10_000, 'sgd'), (1_281_167, 'sgd')])
def test_adamw_below_large_data(images, opt):
    sched = pick_schedule(images)
    assert sched.opt == opt and sched.why['opt'].startswith(f'--opt {opt} ({images} images')
    assert pick_schedule(images, opt='lamb').opt == 'lamb' and 'opt' not in pick_schedule(images, opt='lamb').why


@pytest.mark.parametrize('opt, scale, batch, world, lr', [
    ('sgd', '', 14, 1, 0.1 * 14 / 256),  # linear for SGD, from --lr-base 0.1 per 256 images
    ('momentum', '', 64, 4, 0.1),
    ('adamw', '', 64, 1, 2e-3),  # square root for adaptive optimizers, as timm's train.py, from 1e-3 per 16
    (None, '', 16, 1, 1e-3),  # the recipe's AdamW at batch 16: Adam's default step
    ('adamw', 'linear', 64, 1, 4e-3),
    ('sgd', 'sqrt', 64, 1, 0.05),
])
def test_the_lr_follows_the_global_batch_by_timms_rule(opt, scale, batch, world, lr):
    sched = pick_schedule(batch * world * MIN_STEPS_PER_EPOCH, world_size=world, opt=opt, lr_base_scale=scale)
    assert sched.batch_size == batch and sched.lr == pytest.approx(lr)
    assert f'{scale or ("linear" if opt in ("sgd", "momentum") else "sqrt")} rule' in sched.why['lr']


@pytest.mark.parametrize('images, opt, weight_decay', [
    (150, None, 0.05),  # the recipe's AdamW: decoupled decay at the AdamW recipes' value
    (1_281_167, None, 2e-5),  # the recipe's SGD: timm's
    (150, 'nadamw', 0.05), (150, 'fusedlamb', 0.05), (150, 'lookahead_adamw', 0.05),
    (150, 'adam', 2e-5), (150, 'momentum', 2e-5),  # L2 decay scaled by the lr: timm's
])
def test_weight_decay_follows_the_optimizer(images, opt, weight_decay):
    sched = pick_schedule(images, opt=opt)
    assert sched.weight_decay == weight_decay
    assert sched.why['weight_decay'].startswith(f'weight decay {weight_decay:g} (')
    assert pick_schedule(images, opt=opt, weight_decay=0.0).weight_decay == 0.0  # given: kept, not explained
    assert 'weight_decay' not in pick_schedule(images, opt=opt, weight_decay=0.0).why


def test_lr_base_flags_replace_the_reference():
    sched = pick_schedule(160, opt='adamw', lr_base=4e-3, lr_base_size=64)
    assert sched.batch_size == 16 and sched.lr == pytest.approx(2e-3)
    assert sched.why['lr'] == 'lr 0.002 (0.004 per 64 images, sqrt rule for --opt adamw)'


def test_given_step_settings_are_kept_and_only_explained():
    sched = pick_schedule(150, batch_size=15, lr=0.3, epochs=7, opt='sgd', weight_decay=1e-4)
    assert (sched.opt, sched.weight_decay, sched.batch_size, sched.lr, sched.epochs, sched.steps_per_epoch) == (
        'sgd', 1e-4, 15, 0.3, 7, 10)
    assert sched.why == {} and sched.warning == ''
    given_batch = pick_schedule(150, batch_size=32, opt='sgd')
    assert given_batch.lr == pytest.approx(0.1 * 32 / 256) and given_batch.epochs == 125  # 4 steps per epoch


@pytest.mark.parametrize('images, batch, world, steps', [(144, 128, 1, 1), (150, 32, 1, 4), (400, 32, 2, 6)])
def test_a_given_batch_with_few_steps_gets_one_warning(images, batch, world, steps):
    sched = pick_schedule(images, world_size=world, batch_size=batch)
    better = pick_schedule(images, world_size=world).batch_size
    assert sched.warning.startswith(f'--batch-size {batch} gives {steps} optimizer step')
    assert f'(fewer than {MIN_STEPS_PER_EPOCH})' in sched.warning and sched.warning.count('\n') == 0
    assert sched.warning.endswith(f'Try --batch-size {better}, or leave --batch-size unset.')
    assert not pick_schedule(images, world_size=world, batch_size=better).warning


def test_step_flags_config_and_api_win(tmp_path):
    data = DataSummary(num_images=150, num_classes=3, grey=True)
    flags = ['-b', '10', '--lr', '0.02', '--epochs', '3', '--opt', 'sgd']
    cfg, line, _ = apply_recipe(parse_config(TrainConfig, flags), data, 32)
    assert (cfg.opt, cfg.batch_size, cfg.lr, cfg.epochs) == ('sgd', 10, 0.02, 3)
    assert 'batch ' not in line and 'lr 0' not in line and 'epochs (' not in line and '--opt' not in line
    assert 'The run: 3 epochs x 15 steps = 45 optimizer steps.' in line
    path = tmp_path / 'c.yaml'
    path.write_text('batch_size: 30\nepochs: 2\nopt: sgd\n')
    cfg, line, warning = apply_recipe(parse_config(TrainConfig, ['--config', str(path)]), data, 32)
    assert (cfg.batch_size, cfg.epochs, cfg.lr) == (30, 2, pytest.approx(0.1 * 30 / 256))  # the lr follows the batch
    assert 'lr 0.0117 (0.1 per 256 images, linear rule for --opt sgd)' in line
    assert 'Try --batch-size 14' in warning
    cfg, line, _ = apply_recipe(TrainConfig(batch_size=50, lr=1e-3, epochs=4), data, 32)
    assert (cfg.batch_size, cfg.lr, cfg.epochs) == (50, 1e-3, 4)
    unset, line, _ = apply_recipe(TrainConfig(), data, 32)
    assert (unset.opt, unset.batch_size, unset.epochs) == ('adamw', 14, 50)
    assert '50 epochs (the step budget for < 20000 images: 500)' in line
    assert 'The run: 50 epochs x 10 steps = 500 optimizer steps.' in line
    _, line, _ = apply_recipe(TrainConfig(epochs=8), DataSummary(num_images=200, num_classes=4, grey=False), 32)
    assert ('batch 16 (12 steps per epoch over 200 images: the smallest batch the recipe uses; the step budget 500 '
            'would need 63 per epoch in 8 epochs)') in line


@pytest.mark.parametrize('name', ['epsanet50.yaml', 'epsanet101_large.yaml'])
def test_imagenet_recipe_is_untouched(name):
    cfg = parse_config(TrainConfig, ['--config', str(CONFIGS / 'imagenet' / name), '--data-dir', 'x'])
    small = DataSummary(num_images=100, num_classes=3, grey=True)  # even on data it was not made for
    picked, line, _ = apply_recipe(cfg, small, img_size=32)
    # only the lr update interval and BatchNorm recalibration are left open; without warm-up the lr stays on timm's
    # per-epoch schedule, and on ImageNet-sized data the running statistics are kept as trained
    assert picked == dataclasses.replace(cfg, sched_on_updates=False, bn_recalibrate=True)
    assert 'lr updated every epoch' in line
    big = DataSummary(num_images=1_281_167, num_classes=1000, grey=False)
    assert apply_recipe(cfg, big, img_size=224)[0] == dataclasses.replace(cfg, sched_on_updates=False,
                                                                          bn_recalibrate=False)
    assert (cfg.scale, cfg.color_jitter, cfg.crop_pct, cfg.warmup_epochs) == ((0.08, 1.0), 0.0, 0.875, 0)


def test_every_shipped_config_sets_the_recipe_fields():
    for path in CONFIGS.rglob('*.yaml'):
        text = yaml.safe_load(path.read_text())
        optional = ('crop_pct', 'sched_on_updates', 'bn_recalibrate')
        missing = [f for f in (*STEP_FIELDS, *AUTO_FIELDS) if f not in text and f not in optional]
        assert not missing, f'{path.name} leaves {missing} to the recipe'


def test_summarize_tells_grey_from_colour(tmp_path):
    colour = write_image_folder(tmp_path / 'c', classes=('a', 'b'), splits={'train': 3})
    paths = sorted(str(p) for p in colour.rglob('*.png'))
    assert summarize(paths, 2) == DataSummary(num_images=6, num_classes=2, grey=False)
    rng = np.random.default_rng(0)
    grey_paths = []
    for i, mode in enumerate(['L', 'RGB', 'RGB']):  # a grey PNG and grey photos saved as RGB JPEGs
        pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        path = tmp_path / f'{i}.{"png" if mode == "L" else "jpg"}'
        Image.fromarray(pixels).convert(mode).save(path)
        grey_paths.append(str(path))
    assert summarize(grey_paths, 1).grey
    assert not summarize(grey_paths + paths[:1], 1).grey  # one colour image: colour
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    assert summarize(grey_paths + [str(tmp_path / 'broken.png')], 1).grey  # unreadable files are left to the loader


def test_model_img_size():
    assert model_img_size('epsanet50') == 224


@pytest.mark.slow
def test_training_logs_the_picked_recipe_once_and_saves_it(tmp_path, caplog):
    """One short real run with nothing but the data, the size and one epoch: the recipe's batch gives the
    minimum number of steps, the line says so, and args.yaml keeps what was picked."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = write_image_folder(tmp_path / 'd', classes=('a', 'b'), splits={'train': 40, 'val': 1})
    steps = []

    class Steps(Callback):
        def on_step(self, epoch, step, loss, lr):
            steps.append((epoch, step, lr))

    result = train(TrainConfig(data_dir=str(data), output=str(tmp_path / 'run'), img_size=32, epochs=1, workers=0,
                               progress=False), callbacks=[Steps()])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('recipe for')]
    assert lines == ['recipe for 80 colour images, 2 classes, 32 px: --opt adamw (80 images < 10000), weight decay '
                     '0.05 (decoupled, as the AdamW and LAMB recipes), batch 8 (the '
                     'largest with >= 10 steps per epoch: 10 over 80 images), lr 0.000707 (0.001 per 16 images, sqrt '
                     'rule for --opt adamw), no '
                     'random crop (80 images < 10000), no colour jitter (80 images < 10000), no eval centre crop (32 '
                     'px <= 64), no label smoothing (80 images < 10000), no warm-up (80 images < 10000), lr updated '
                     'every epoch, BatchNorm statistics recomputed before each validation. The run: 1 epoch x 10 '
                     'steps = 10 optimizer steps. Set --opt --weight-decay --batch-size --lr --scale --color-jitter '
                     '--crop-pct '
                     '--smoothing --warmup-epochs --sched-on-updates --bn-recalibrate (or --config) to choose.']
    assert len(steps) == MIN_STEPS_PER_EPOCH and steps[0][2] == pytest.approx(1e-3 * (8 / 16) ** 0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == LOGGER]
    saved = yaml.safe_load((result.output_dir / 'args.yaml').read_text())
    assert (saved['opt'], saved['weight_decay'], saved['batch_size'], saved['epochs']) == ('adamw', 0.05, 8, 1)
    assert saved['lr'] == pytest.approx(1e-3 * (8 / 16) ** 0.5)
    assert (saved['scale'], saved['color_jitter'], saved['crop_pct'], saved['warmup_epochs']) == ([1.0, 1.0], 0.0,
                                                                                                  1.0, 0)
    assert saved['sched_on_updates'] is False and saved['bn_recalibrate'] is True and saved['smoothing'] == 0.0


@pytest.mark.slow
def test_training_warns_once_about_a_given_batch_with_few_steps(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = write_image_folder(tmp_path / 'd', classes=('a', 'b'), splits={'train': 40, 'val': 1})
    train(TrainConfig(data_dir=str(data), output=str(tmp_path / 'run'), img_size=32, epochs=1, batch_size=16,
                      workers=0, progress=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert warnings == ['--batch-size 16 gives 5 optimizer steps per epoch over 80 images (fewer than 10): the lr '
                        'schedule and the BatchNorm statistics get few updates. Try --batch-size 8, or leave '
                        '--batch-size unset.']
