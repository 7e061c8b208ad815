"""Real signals to real ``epsanet train`` processes; every resumed run must end exactly like an uninterrupted one.

The child stops at an exact point through the test hook of :mod:`epsanet.train.interrupt`: it pauses
there and writes its pid to a file; the test then sends the real signal (SIGINT, SIGTERM, SIGUSR1 or
SIGKILL) from outside, the child's real handler saves, and the process really exits.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from epsanet.data import write_image_folder
from epsanet.train.checkpoint import load_state

pytestmark = pytest.mark.slow

# drop-path, mixup and EMA make the run depend on the global generators and the EMA state too
ARGS = ['--img-size', '32', '-b', '4', '--epochs', '2', '--workers', '0', '--opt', 'sgd', '--lr', '1e-3',
        '--warmup-epochs', '0', '--crop-pct', '1', '--no-progress', '--seed', '3', '--drop-path', '0.1', '--mixup',
        '0.2', '--model-ema', '--model-ema-decay', '0.9', '--device', 'cpu']
TIMEOUT = 300


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # 12 training images, batch 4: 3 steps per epoch
    return write_image_folder(tmp_path_factory.mktemp('data'), classes=('a', 'b', 'c'), splits={'train': 4, 'val': 2})


def _command(data, out, *extra):
    return [sys.executable, '-m', 'epsanet', 'train', '--data-dir', str(data), '--output', str(out), *ARGS, *extra]


def _env(**extra):
    # one thread: these runs must compute identically in separate processes
    return dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', **extra)


def run(cmd, log, pause=None, sig=None, env=None, group=False):
    """Run ``cmd``; with ``pause`` ("point:n"), send ``sig`` when the child reaches that point (with ``group``, to
    its whole process group, as a terminal, ``timeout`` or SLURM do). Returns ``(exit code, stderr)``."""
    marker = log.with_suffix('.paused')
    env = env or _env()
    if pause:
        env = dict(env, EPSANET_TEST_PAUSE_AT=pause, EPSANET_TEST_PAUSE_FILE=str(marker))
    with open(log, 'w') as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, start_new_session=group)
        try:
            if pause:
                deadline = time.monotonic() + TIMEOUT
                while not marker.exists():
                    assert proc.poll() is None, f'exited ({proc.returncode}) before {pause}:\n{log.read_text()[-3000:]}'
                    assert time.monotonic() < deadline, f'never reached {pause}'
                    time.sleep(0.05)
                os.killpg(proc.pid, sig) if group else os.kill(int(marker.read_text()), sig)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, log.read_text()


def _metrics(out):
    rows = json.loads((out / 'metrics.json').read_text())
    return [{k: v for k, v in r.items() if k != 'train_img_per_sec'} for r in rows]  # all but the timing


def assert_same_run(out, reference):
    assert _metrics(out) == _metrics(reference)  # exactly: per-epoch losses, accuracies, lr
    for name in ('last.safetensors', 'best.safetensors'):
        got, want = load_file(out / name), load_file(reference / name)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    root = tmp_path_factory.mktemp('reference')
    code, log = run(_command(data, root / 'run'), root / 'log')
    assert code == 0, log[-3000:]
    return root / 'run'


def test_stopped_five_times_by_four_signals_resumes_exactly(data, reference, tmp_path):
    out = tmp_path / 'run'
    # what a requeued job runs: the same command each time; with --checkpoint-interval 2 (the reference has none)
    auto = _command(data, out, '--resume', 'auto', '--checkpoint-interval', '2')

    # 1. SIGUSR1 (SLURM's warning) early, during set-up: nothing to save yet
    code, log = run(auto, tmp_path / '1.log', 'setup:1', signal.SIGUSR1)
    assert code == 138, log[-3000:]
    assert 'stopped by SIGUSR1 during set-up' in log and 'Traceback' not in log
    assert not (out / 'last.state.pth').exists()

    # 2. Ctrl-C mid-epoch, after step 2 of epoch 1: the exact position is saved, the resume command printed
    code, log = run(auto, tmp_path / '2.log', 'step:2', signal.SIGINT)
    assert code == 130, log[-3000:]
    assert 'no saved state' in log and 'stopped by SIGINT at epoch 1, step 2 of 3' in log
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step'], state['stopped_by']) == (0, 2, 'SIGINT')
    printed = log.split('Resume with the same command plus --resume auto, or: ')[1].split(' (exit code')[0]

    # 3. the printed command; SIGTERM during the validation of epoch 1: the steps are kept, validation reruns
    assert shlex.split(printed)[:2] == ['epsanet', 'train']
    code, log = run([sys.executable, '-m', 'epsanet', *shlex.split(printed)[1:]], tmp_path / '3.log', 'validate:1',
                    signal.SIGTERM)
    assert code == 143, log[-3000:]
    assert 'stopped by SIGTERM after the steps of epoch 1, before its validation' in log
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step']) == (0, 3)

    # 4. SIGKILL inside the write of the interval state after global step 4 (the epoch-1 state was write 1)
    code, log = run(auto, tmp_path / '4.log', 'state-write:2', signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert list(out.glob('.last.state.pth.*.tmp'))  # the unfinished write; the previous state is intact
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step']) == (1, 0)

    # 5. SIGKILL during the validation of epoch 2: the interval state after global step 6 survives
    code, log = run(auto, tmp_path / '5.log', 'validate:1', signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert 'removed 1 unfinished temporary files' in log and not list(out.glob('.*.tmp'))
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step']) == (1, 3)

    # 6. the same command once more finishes the run: identical to the uninterrupted one
    code, log = run(auto, tmp_path / '6.log')
    assert code == 0, log[-3000:]
    assert_same_run(out, reference)
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step'], state['stopped_by']) == (2, 0, None)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_stops_the_run_not_its_data_workers(data, tmp_path, sig):
    # the DataLoader workers get the signal too; PyTorch's worker SIGTERM handler would end them at once
    out = tmp_path / 'run'
    code, log = run(_command(data, out, '--workers', '2'), tmp_path / 'log', 'step:2', sig, group=True)
    assert code == 128 + sig, log[-3000:]
    assert f'stopped by {signal.Signals(sig).name} at epoch 1, step 2 of 3' in log and 'Traceback' not in log
    assert 'DataLoader worker' not in log
    state = load_state(out / 'last.state.pth')
    assert (state['epoch'], state['step']) == (0, 2)
