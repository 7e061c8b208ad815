"""``epsanet train`` / ``validate`` / ``extract`` end to end through the command line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

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
    (['extract', '--data-dir', '.', '--output', 'x.csv'], 'give a folder (sharded safetensors), a .npy'),
    (['train'], '--data-dir is required'),
    (['train', '--data-dir', '.', '--resume', 'auto'], '--resume auto needs --output'),
    (['train', '--data-dir', '.', '--checkpoint-interval', '-1'], '--checkpoint-interval must be >= 0; got -1'),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def _torchrun(data, out, *torchrun_args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *torchrun_args,
            '-m', 'epsanet', 'train', '--data-dir', str(data), '--output', str(out), '--img-size', '32', '-b', '2',
            '--epochs', '2', '--workers', '0', '--opt', 'sgd', '--lr', '1e-3', '--warmup-epochs', '0', '--crop-pct',
            '1', '--no-progress', '--device', 'cpu', '--drop-path', '0.1', '--resume', 'auto', '--checkpoint-interval',
            '2']


# one thread: two processes must compute identically
_TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-process run: 12 images, 3 steps of 2 per process and epoch, 2 epochs."""
    root = tmp_path_factory.mktemp('ddp')
    # 3 val images over 2 processes: the second is padded with a repeat that must not be counted
    data = write_image_folder(root / 'data', classes=('a', 'b', 'c'), splits={'train': 4, 'val': 1})
    out = root / 'ddp'
    proc = subprocess.run(_torchrun(data, out), capture_output=True, text=True, env=_TORCHRUN_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out, proc


def test_torchrun_two_cpu_processes(ddp_run):
    _, out, proc = ddp_run
    assert proc.stderr.count('on cpu (2 processes)') == 1  # rank 0 logs alone
    assert proc.stdout.count('Best top-1') == 1
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 2 and all(round(r['val_top1'] * 3 / 100, 6) in (0, 1, 2, 3) for r in rows)
    assert sorted(p.name for p in out.iterdir()) == [
        'args.yaml', 'best.safetensors', 'last.safetensors', 'last.state.pth', 'metrics.csv', 'metrics.json',
        'metrics.png']


def test_torchrun_restarts_after_a_rank_is_killed_and_resumes_exactly(ddp_run, tmp_path):
    data, reference, _ = ddp_run
    out, marker = tmp_path / 'ddp', tmp_path / 'paused'
    # rank 1 pauses after global step 5 (epoch 2, step 2; the last state is the interval one after step 4) and
    # is killed there; torchrun restarts both processes with the same command, which resumes from that state
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torch 2.14's torchrun keeps the first attempt's store for the restarted
    # workers, whose gloo set-up then reads the dead workers' addresses from it (pytorch/pytorch#135712)
    env = dict(_TORCHRUN_ENV, EPSANET_TEST_PAUSE_AT='step:5@1', EPSANET_TEST_PAUSE_FILE=str(marker),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    with open(tmp_path / 'log', 'w') as log:
        proc = subprocess.Popen(_torchrun(data, out, '--max-restarts', '1'), stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'log').read_text()[-3000:]
                time.sleep(0.05)
            os.kill(int(marker.read_text()), signal.SIGKILL)
            assert proc.wait(timeout=600) == 0, (tmp_path / 'log').read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / 'log').read_text()
    assert '--resume auto: resuming from' in text and str(out / 'last.state.pth') in text
    got, want = json.loads((out / 'metrics.json').read_text()), json.loads((reference / 'metrics.json').read_text())
    for row in got + want:
        row.pop('train_img_per_sec')
    assert got == want
    final, expected = load_file(out / 'last.safetensors'), load_file(reference / 'last.safetensors')
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


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
