"""Every option is checked before any work: one line naming the flag and its allowed values, exit status 2,
no traceback, nothing written (epsanet/app/flags.py's BOUNDS and CHECKS, the CLI's BOUNDS).

Most cases run in-process through ``main``; a representative few run the console script as a real process.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epsanet.cli import build_parser, main

FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9-]*')
NO_CUDA = not torch.cuda.is_available()

# (argv, the flag the message must name, text the message must hold); DATA is replaced by a tiny data folder
CASES = [
    (['predict', '-b', '0', 'x.jpg'], '--batch-size', 'must be >= 1; got 0'),
    (['predict', '--workers', '-1', 'x.jpg'], '--workers', 'must be >= 0; got -1'),
    (['predict', '--img-size', '0', 'x.jpg'], '--img-size', 'must be >= 1; got 0'),
    (['predict', '--topk', '0', 'x.jpg'], '--topk', 'must be >= 1'),
    (['predict', '--device', 'nosuch', 'x.jpg'], '--device', 'is not a device name'),
    (['validate', '--data-dir', 'DATA', '--crop-pct', '-0.5'], '--crop-pct', 'must be > 0 and <= 1; got -0.5'),
    (['validate', '--data-dir', 'DATA', '--std', '0', '1', '1'], '--std', 'must be > 0'),
    (['train', '--data-dir', 'DATA', '--drop', '1.5'], '--drop', 'must be >= 0 and < 1; got 1.5'),
    (['train', '--data-dir', 'DATA', '--img-size', '0'], '--img-size', 'must be >= 1; got 0'),
    (['train', '--data-dir', 'DATA', '--img-size', '16'], '--img-size', 'must be >= 32 for epsanet50'),
    (['train', '--data-dir', 'DATA', '--lr', '-1'], '--lr', 'must be > 0'),
    (['train', '--data-dir', 'DATA', '--smoothing', '1'], '--smoothing', 'must be >= 0 and < 1'),
    (['train', '--data-dir', 'DATA', '--epochs', '0'], '--epochs', 'must be >= 1'),
    (['extract', '--data-dir', 'DATA', '-b', '0'], '--batch-size', 'must be >= 1'),
    (['explain', '--device', 'cuda:7', 'x.jpg'], '--device', 'device'),
    (['quantize', '--data-dir', 'DATA', '--calibration-images', '0'], '--calibration-images', 'must be >= 1'),
    (['export', '--opset', '3'], '--opset', 'must be >= 7 and <= '),
    (['export', '--img-size', '16'], '--img-size', 'must be >= 32'),
    (['benchmark', '--reps', '0'], '--reps', 'must be >= 1; got 0'),
    (['benchmark', '--img-sweep', '160', '8'], '--img-sweep', 'must be >= 32; got 160 8'),
]
if NO_CUDA:
    CASES.append((['train', '--data-dir', 'DATA', '--device', 'cuda'], '--device', 'this machine has no cuda device'))


def _argv(argv, data):
    return [str(data) if a == 'DATA' else a for a in argv]


def _parser_flags(command):
    subparsers = next(a for a in build_parser()._actions if hasattr(a, 'choices') and isinstance(a.choices, dict))
    return {o for action in subparsers.choices[command]._actions for o in action.option_strings}


def _check_message(err: str, command: str, flag: str, text: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f'epsanet {command}: error: {flag}'), line
    assert text in line and 'Traceback' not in err
    assert set(FLAG.findall(line)) <= _parser_flags(command), line  # hints name only this command's flags


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from epsanet.data import write_image_folder
    return write_image_folder(tmp_path_factory.mktemp('options') / 'data', classes=('a', 'b'),
                              splits={'train': 1, 'val': 1}, size=32)


@pytest.mark.parametrize('argv, flag, text', CASES, ids=[' '.join(c[0][:3]) for c in CASES])
def test_bad_option_is_one_line_before_any_work(argv, flag, text, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_argv(argv, data)) == 2
    _check_message(capsys.readouterr().err, argv[0], flag, text)
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no output file


def test_yaml_values_are_checked_like_flags(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'c.yaml').write_text('batch_size: 0\n')
    assert main(['train', '--data-dir', str(data), '--config', 'c.yaml']) == 2
    _check_message(capsys.readouterr().err, 'train', '--batch-size', 'must be >= 1; got 0')


def _console_script():
    script = Path(sys.executable).with_name('epsanet')
    return [str(script)] if script.is_file() else [shutil.which('epsanet') or 'epsanet']


@pytest.mark.parametrize('argv, flag, text', [
    (['export', '--opset', '3'], '--opset', 'must be >= 7'),
    (['train', '--data-dir', 'DATA', '--img-size', '0', '--output', 'run'], '--img-size', 'must be >= 1'),
])
def test_bad_option_in_a_real_process(argv, flag, text, data, tmp_path):
    proc = subprocess.run(_console_script() + _argv(argv, data), cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _check_message(proc.stderr, argv[0], flag, text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('argv, hint', [
    (['train', '--data-dir', 'DATA', '--epocs', '3'], '(did you mean --epochs?)'),
    (['validate', '--data-dir', 'DATA', '--crop-pcnt=0.9'], '(did you mean --crop-pct?)'),
    (['predict', '--zzzzzz', 'x.jpg'], None),
])
def test_a_mistyped_flag_is_one_line_naming_the_flag_meant(argv, hint, data, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(_argv(argv, data))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no usage block
    line = err.strip()
    assert line.startswith(f'epsanet {argv[0]}: error: unrecognized arguments: '), line
    assert line.endswith(f'(see epsanet {argv[0]} --help)'), line
    assert (hint in line) if hint else ('did you mean' not in line), line
    assert list(tmp_path.iterdir()) == []
