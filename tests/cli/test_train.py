"""``epsanet train`` / ``validate`` / ``extract`` end to end through the command line."""
import json
import os
import subprocess
import sys

import pytest

from epsanet.cli import main
from epsanet.data import write_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    data = write_image_folder(root / 'data', classes=('a', 'b', 'c'), splits={'train': 4, 'val': 2})
    config = root / 'probe.yaml'
    config.write_text('img_size: 32\nbatch_size: 4\nepochs: 1\nworkers: 0\nfreeze: [backbone]\nopt: adamw\n'
                      'lr: 1.0e-3\nwarmup_epochs: 0\ncrop_pct: 1.0\nprogress: false\n')
    out = root / 'run'
    code = main(['train', '--config', str(config), '--data-dir', str(data), '--output', str(out), '--model-ema',
                 '--mixup', '0.2', '--layer-decay', '0.8'])
    assert code == 0
    return data, out


def test_train_cli_writes_a_run(trained, capsys):
    _, out = trained
    assert (out / 'best.safetensors').is_file() and (out / 'metrics.csv').is_file()
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 1 and 'ema_val_top1' in rows[0]


@pytest.mark.parametrize('argv, message', [
    (['train', '--data-dir', 'no/such/dir'], 'data dir no/such/dir does not exist'),
    (['validate', '--data-dir', 'no/such/dir'], 'does not exist'),
    (['extract', '--data-dir', '.', '--output', 'x.csv'], 'use a .safetensors or .npy'),
    (['train'], '--data-dir is required'),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_torchrun_two_cpu_processes(tmp_path):
    # 3 val images over 2 processes: the second is padded with a repeat that must not be counted
    data = write_image_folder(tmp_path / 'data', classes=('a', 'b', 'c'), splits={'train': 4, 'val': 1})
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'epsanet', 'train', '--data-dir', str(data), '--output', str(out), '--img-size', '32', '-b', '2',
           '--epochs', '1', '--workers', '0', '--opt', 'sgd', '--lr', '0.01', '--warmup-epochs', '0', '--crop-pct', '1',
           '--no-progress', '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count('on cpu (2 processes)') == 1  # rank 0 logs alone
    assert proc.stdout.count('Best top-1') == 1
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 1 and round(rows[0]['val_top1'] * 3 / 100, 6) in (0, 1, 2, 3)
    assert sorted(p.name for p in out.iterdir()) == [
        'args.yaml', 'best.safetensors', 'last.safetensors', 'last.state.pth', 'metrics.csv', 'metrics.json',
        'metrics.png']


def test_log_to_a_file_is_plain_lines(tmp_path):
    # stderr redirected to a file, as `epsanet train ... > train.log 2>&1` does: no tqdm carriage returns, one line
    # per log interval (0 s here: every batch) and per epoch, for training and validation
    data = write_image_folder(tmp_path / 'data', classes=('a', 'b'), splits={'train': 4, 'val': 2})
    log = tmp_path / 'train.log'
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    cmd = [sys.executable, '-m', 'epsanet', 'train', '--data-dir', str(data), '--output', str(tmp_path / 'run'),
           '--img-size', '32', '-b', '4', '--epochs', '2', '--workers', '0', '--opt', 'sgd', '--lr', '0.01',
           '--log-interval', '0']
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert '\r' not in text and '\x1b' not in text
    lines = text.splitlines()
    for epoch in (1, 2):
        steps = [line for line in lines if f'epoch {epoch}/2: ' in line and ' batch/s' in line]
        assert [s.split('progress: ')[1].split(',')[0] for s in steps] == [f'epoch {epoch}/2: 1/2 (50%)',
                                                                            f'epoch {epoch}/2: 2/2 (100%)']
        assert 'loss=' in steps[-1] and 'lr=' in steps[-1]
        assert sum(f'epoch {epoch}/2: train loss' in line for line in lines) == 1
    assert sum('validate: 1/1 (100%)' in line for line in lines) == 2  # one validation pass per epoch
    assert sum(line.startswith('INFO epsanet.train.loop: recipe for 8 colour images') for line in lines) == 1
    assert all(len(line) < 200 for line in lines if 'epsanet.progress' in line)
