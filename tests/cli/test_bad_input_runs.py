"""Bad input that needs real processes running at once: two runs in one folder, a run killed by a
signal before its first step, and a full disk. Same three checks as ``test_bad_input.py``: exit status,
a short message without a traceback, and every file that existed before unchanged."""
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import timm
import torch

from epsanet.data import write_image_folder
from epsanet.train.checkpoint import save_weights

pytestmark = pytest.mark.slow

EPSANET = Path(sys.executable).parent / 'epsanet'
TRAIN = ['train', '--model', 'test_resnet', '--img-size', '32', '-b', '2', '--workers', '0', '--no-progress', '--opt',
         'sgd', '--lr', '0.01', '--warmup-epochs', '0']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')


def start(argv: List[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(EPSANET), *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def finish(proc: subprocess.Popen, status: int, message: Optional[str] = None, timeout: float = 240) -> str:
    out, err = (s.decode('utf-8', 'replace') for s in proc.communicate(timeout=timeout))
    assert proc.returncode == status, f'exit {proc.returncode}, expected {status}\n{out}\n{err}'
    assert 'Traceback' not in out + err, err
    if message is not None:
        assert message in err, err
    return err


def snapshot(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob('*') if p.is_file() and not p.is_symlink()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f'{path} did not appear'
        time.sleep(0.1)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('runs') / 'data', classes=('a', 'b'),
                              splits={'train': 6, 'val': 2}, size=16)


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(data, tmp_path):
    """The first run is held after its first step (train/interrupt.py's test hook) while the second starts; the
    first then stops on SIGTERM with its state saved, untouched by the second."""
    marker = tmp_path / 'paused'
    env = dict(ENV, EPSANET_TEST_PAUSE_AT='step:1', EPSANET_TEST_PAUSE_FILE=str(marker))
    first = subprocess.Popen([str(EPSANET), *TRAIN, '--data-dir', str(data), '--output', 'run', '--epochs', '2'],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker, first)
    before = snapshot(tmp_path / 'run')
    second = start([*TRAIN, '--data-dir', str(data), '--output', 'run', '--epochs', '1', '--overwrite'], tmp_path)
    finish(second, 2, f'in use by another run (PID {first.pid}')
    assert snapshot(tmp_path / 'run') == before
    first.send_signal(signal.SIGTERM)
    finish(first, 143, 'SIGTERM')
    assert (tmp_path / 'run' / 'last.state.pth').is_file() and not (tmp_path / 'run' / '.epsanet.lock').exists()


def test_a_run_stopped_before_its_first_step_writes_nothing(data, tmp_path, monkeypatch):
    """SIGTERM during set-up: exit 143 and no run folder. SIGKILL: the lock stays behind (no process can
    remove it), and the next run takes it over, naming nothing of the dead run as a run to resume."""
    argv = [*TRAIN, '--data-dir', str(data), '--output', 'run', '--epochs', '1']
    for kill, marker in ((False, tmp_path / 'paused-1'), (True, tmp_path / 'paused-2')):
        # train/interrupt.py's test hook: the run waits at the end of its set-up until a signal comes
        env = dict(ENV, EPSANET_TEST_PAUSE_AT='setup', EPSANET_TEST_PAUSE_FILE=str(marker))
        proc = subprocess.Popen([str(EPSANET), *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        wait_for(marker, proc)
        assert os.listdir(tmp_path / 'run') == ['.epsanet.lock']
        if kill:
            proc.kill()
            proc.communicate()
            assert os.listdir(tmp_path / 'run') == ['.epsanet.lock']  # no process was left to remove it
        else:
            proc.send_signal(signal.SIGTERM)
            finish(proc, 143, 'SIGTERM')
            assert not (tmp_path / 'run').exists()
    finish(start(argv, tmp_path), 0)  # the stale lock of the dead run is taken over
    assert (tmp_path / 'run' / 'args.yaml').is_file()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture
def full_disk(tmp_path):
    """(folder, preexec_fn): a 512 KiB tmpfs where one is allowed, else a file-size limit of 256 KiB."""
    folder = tmp_path / 'disk'
    mounted = _tmpfs(folder, '512k')
    preexec = None
    if not mounted:
        def preexec():  # writes past the limit fail with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    (folder / 'mine.txt').write_text('a file of the user\'s on the small disk\n')
    yield folder, preexec
    if mounted:
        subprocess.run(['umount', str(folder)], capture_output=True, timeout=30)


@pytest.mark.parametrize('command', ['train', 'export'])
def test_a_full_disk_is_one_line_and_keeps_what_was_there(data, full_disk, command, tmp_path):
    folder, preexec = full_disk
    if command == 'train':
        argv = [*TRAIN, '--data-dir', str(data), '--output', str(folder / 'run'), '--epochs', '1']
    else:
        torch.manual_seed(0)
        save_weights(tmp_path / 'w.safetensors', timm.create_model('test_resnet', num_classes=2).state_dict())
        argv = ['export', 'test_resnet', '--num-classes', '2', '--weights', str(tmp_path / 'w.safetensors'), '-o',
                str(folder / 'm.onnx'), '--img-size', '32', '--no-check', '--onnx-forms', 'plain']
    before = snapshot(folder)
    proc = start(argv, tmp_path, preexec_fn=preexec)
    err = finish(proc, proc.wait(timeout=240) or 1)
    assert proc.returncode != 0 and any(m in err for m in ('disk is full', 'No space left', 'too large')), err
    after = snapshot(folder)
    assert {k: after.get(k) for k in before} == before
    assert not [name for name in after if name.startswith('.') or '/.' in name and '.tmp' in name]  # no leftovers
