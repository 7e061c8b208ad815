"""Every YAML recipe under configs/ parses into the training options."""
from pathlib import Path

import pytest

from epsanet import MODEL_NAMES
from epsanet.app.flags import parse_config
from epsanet.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / 'configs').rglob('*.yaml'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg = parse_config(TrainConfig, ['--config', str(path), '--data-dir', 'x'])
    assert cfg.model in MODEL_NAMES


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_authors_imagenet_recipe(model):
    path = Path(__file__).resolve().parents[2] / 'configs' / 'imagenet' / f'{model}.yaml'
    cfg = parse_config(TrainConfig, ['--config', str(path), '--data-dir', 'x'])
    # spec section 5: SGD momentum 0.9 without Nesterov, lr 0.1 for 8 x 32 = 256 images, wd 1e-4 on everything,
    # x0.1 every 30 epochs, 120 epochs, label smoothing 0.1, eval resize 256 / crop 224 bilinear
    assert (cfg.model, cfg.opt, cfg.momentum, cfg.lr, cfg.batch_size * 8) == (model, 'momentum', 0.9, 0.1, 256)
    assert (cfg.weight_decay, cfg.filter_bias_and_bn) == (1e-4, False)
    assert (cfg.sched, cfg.decay_epochs, cfg.decay_rate, cfg.epochs, cfg.warmup_epochs) == ('step', 30, 0.1, 120, 0)
    assert (cfg.smoothing, cfg.img_size, cfg.crop_pct, cfg.interpolation) == (0.1, 224, 0.875, 'bilinear')
    assert cfg.mixup == cfg.cutmix == cfg.color_jitter == 0
