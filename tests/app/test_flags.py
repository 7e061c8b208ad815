import argparse

import pytest

from epsanet.app.errors import ConfigError
from epsanet.app.flags import add_config_arguments, config_from_args, default_workers, parse_config
from epsanet.train import TrainConfig


def test_flags_follow_timm_names():
    cfg = parse_config(TrainConfig, ['--data-dir', 'd', '-b', '8', '--lr', '0.01', '--opt', 'adamw', '--sched', 'step',
                                     '--warmup-epochs', '0', '--smoothing', '0', '--mixup', '0.2', '--cutmix', '1.0',
                                     '--amp', '--channels-last', '--grad-checkpointing', '--model-ema',
                                     '--scale', '0.5', '1', '--freeze', 'backbone', '--no-progress'])
    assert (cfg.data_dir, cfg.batch_size, cfg.lr, cfg.opt, cfg.sched) == ('d', 8, 0.01, 'adamw', 'step')
    assert cfg.amp and cfg.channels_last and cfg.grad_checkpointing and cfg.model_ema and not cfg.progress
    assert cfg.scale == (0.5, 1.0) and cfg.freeze == ('backbone',) and cfg.mixup == 0.2


def test_yaml_sets_flags_and_command_line_wins(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('data_dir: imgs\nbatch-size: 16\nlr: 1e-3\nscale: [0.3, 1.0]\nmodel_ema: true\nepochs: 7\n')
    cfg = parse_config(TrainConfig, ['--config', str(path), '--epochs', '3'])
    assert cfg.data_dir == 'imgs' and cfg.batch_size == 16 and cfg.lr == 1e-3  # YAML reads 1e-3 as a string
    assert cfg.scale == (0.3, 1.0) and cfg.model_ema and cfg.epochs == 3
    assert cfg.opt == TrainConfig().opt  # untouched flags keep their defaults


@pytest.mark.parametrize('text, match', [
    ('batch_sise: 4\n', 'unknown key "batch_sise".*batch-size'),
    ('epochs: many\n', 'key "epochs"'),
    ('amp: 3\n', 'expected true or false'),
    ('- a list\n', 'must be a mapping'),
    ('a: [unclosed\n', 'not valid YAML'),
])
def test_bad_yaml_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(TrainConfig, ['--config', str(path)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        parse_config(TrainConfig, ['--config', str(tmp_path / 'none.yaml')])


def test_every_field_is_a_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    assert config_from_args(TrainConfig, parser.parse_args([])) == TrainConfig()


def test_inference_commands_share_one_set_of_model_options():
    """validate, predict, extract and explain take the same model/weights/transform flags, from one dataclass,
    and those flags reach the config."""
    import dataclasses

    from epsanet.app.model import InferenceModelOptions
    from epsanet.explain import ExplainConfig
    from epsanet.features import ExtractConfig
    from epsanet.predict import PredictConfig
    from epsanet.train.validate import ValidateConfig

    shared = [f.name for f in dataclasses.fields(InferenceModelOptions)]
    assert 'checkpoint' in shared and 'img_size' in shared
    for cls in (ValidateConfig, PredictConfig, ExtractConfig, ExplainConfig):
        assert issubclass(cls, InferenceModelOptions)
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, cls)
        cfg = config_from_args(cls, parser.parse_args(['--checkpoint', 'w.safetensors', '--img-size', '96',
                                                       '--mean', '0.1', '0.2', '0.3']))
        assert (cfg.checkpoint, cfg.img_size, cfg.mean) == ('w.safetensors', 96, (0.1, 0.2, 0.3)), cls.__name__


def test_values_are_checked_when_a_config_is_made():
    """The Python API gets the CLI's checks: a config with a value outside its bounds is never made."""
    import dataclasses

    from epsanet.predict import PredictConfig

    with pytest.raises(ConfigError, match=r'^--drop must be >= 0 and < 1; got 1.5\.$'):
        TrainConfig(drop=1.5)
    with pytest.raises(ConfigError, match='--scale must be > 0 and <= 1; got 0.5 2'):
        TrainConfig(scale=(0.5, 2.0))
    with pytest.raises(ConfigError, match='--batch-size must be >= 1; got 0'):
        dataclasses.replace(PredictConfig(), batch_size=0)
    with pytest.raises(ConfigError, match='--amp-dtype must be one of float16, bfloat16; got half'):
        PredictConfig(amp_dtype='half')  # a YAML value gets the choices argparse gives a flag
    assert TrainConfig(drop=0.0, scale=(0.08, 1.0)).drop == 0.0


def test_bounds_read_as_the_allowed_values():
    from epsanet.app.flags import Bound

    assert str(Bound(ge=1)) == '>= 1' and str(Bound(gt=0, le=1)) == '> 0 and <= 1'
    assert Bound(ge=0, lt=1).allows(0) and not Bound(ge=0, lt=1).allows(1)


def test_device_must_exist():
    import torch

    from epsanet.app.device import device_problem

    assert device_problem('cpu') is None
    assert 'not a device name' in device_problem('gpu0')
    if not torch.cuda.is_available():
        assert 'no cuda device' in device_problem('cuda')
    else:
        assert 'numbered from 0' in device_problem(f'cuda:{torch.cuda.device_count()}')


@pytest.mark.parametrize('cpus, workers', [(1, 1), (2, 2), (4, 4), (16, 4)])
def test_default_workers_never_outnumber_the_cpus(monkeypatch, cpus, workers):
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: set(range(cpus)), raising=False)
    assert default_workers(4) == workers
