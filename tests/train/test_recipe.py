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
from epsanet.train import TrainConfig, train
from epsanet.train.recipe import AUTO_FIELDS, DataSummary, apply_recipe, model_img_size, pick_recipe, summarize

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'


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
    cfg, line = apply_recipe(TrainConfig(epochs=12, scale=(0.08, 1.0), smoothing=0.2, warmup_epochs=3), data,
                             img_size=32)
    assert cfg.scale == (0.08, 1.0) and cfg.smoothing == 0.2 and cfg.warmup_epochs == 3  # given
    assert (cfg.color_jitter, cfg.crop_pct, cfg.sched_on_updates) == (0.0, 1.0, True)  # picked, for the given warm-up
    assert line.startswith('recipe for 150 grey images, 3 classes, 32 px:') and line.count('\n') == 0
    assert 'no colour jitter (grey images)' in line and '--color-jitter --crop-pct --sched-on-updates' in line
    assert 'random crop' not in line and 'smoothing' not in line and 'warm-up epoch' not in line


def test_flags_and_config_files_win(tmp_path):
    data = DataSummary(num_images=150, num_classes=3, grey=True)
    cfg = parse_config(TrainConfig, ['--data-dir', 'x', '--color-jitter', '0.3', '--crop-pct', '0.9'])
    cfg, _ = apply_recipe(cfg, data, img_size=32)
    assert (cfg.color_jitter, cfg.crop_pct, cfg.scale) == (0.3, 0.9, (1.0, 1.0))
    path = tmp_path / 'c.yaml'
    path.write_text('scale: [0.2, 1.0]\nwarmup_epochs: 0\n')
    cfg, _ = apply_recipe(parse_config(TrainConfig, ['--config', str(path)]), data, img_size=32)
    assert cfg.scale == (0.2, 1.0) and cfg.warmup_epochs == 0


def test_no_warmup_keeps_the_lr_per_epoch():
    values, why = pick_recipe(DataSummary(100, 2, False), img_size=32, epochs=12, warmup_epochs=0)
    assert values['sched_on_updates'] is False and why[-2] == 'lr updated every epoch'
    cfg = parse_config(TrainConfig, ['--warmup-epochs', '3', '--no-sched-on-updates'])
    assert apply_recipe(cfg, DataSummary(100, 2, False), img_size=32)[0].sched_on_updates is False


@pytest.mark.parametrize('name', ['epsanet50.yaml', 'epsanet101_large.yaml'])
def test_imagenet_recipe_is_untouched(name):
    cfg = parse_config(TrainConfig, ['--config', str(CONFIGS / 'imagenet' / name), '--data-dir', 'x'])
    small = DataSummary(num_images=100, num_classes=3, grey=True)  # even on data it was not made for
    picked, line = apply_recipe(cfg, small, img_size=32)
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
        missing = [f for f in AUTO_FIELDS if f not in text and f not in optional]
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
    caplog.set_level(logging.INFO, logger='epsanet.train.loop')
    data = write_image_folder(tmp_path / 'd', classes=('a', 'b'), splits={'train': 4, 'val': 1})
    result = train(TrainConfig(data_dir=str(data), output=str(tmp_path / 'run'), img_size=32, batch_size=4, epochs=1,
                               workers=0, opt='sgd', lr=0.01, progress=False, smoothing=0.0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('recipe for')]
    assert lines == ['recipe for 8 colour images, 2 classes, 32 px: no random crop (8 images < 10000), no colour '
                     'jitter (8 images < 10000), no eval centre crop (32 px <= 64), no warm-up (8 images < 10000), lr '
                     'updated every epoch, BatchNorm statistics recomputed before each validation. Set --scale '
                     '--color-jitter --crop-pct --warmup-epochs --sched-on-updates --bn-recalibrate (or --config) to '
                     'choose.']
    saved = yaml.safe_load((result.output_dir / 'args.yaml').read_text())
    assert (saved['scale'], saved['color_jitter'], saved['crop_pct'], saved['warmup_epochs']) == ([1.0, 1.0], 0.0,
                                                                                                  1.0, 0)
    assert saved['sched_on_updates'] is False and saved['bn_recalibrate'] is True
    assert saved['smoothing'] == 0.0
