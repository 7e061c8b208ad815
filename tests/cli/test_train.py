"""``epsanet train`` / ``validate`` / ``extract`` end to end through the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
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


def test_validate_cli_results_file(trained, tmp_path, capsys):
    data, out = trained
    results = tmp_path / 'r.json'
    code = main(['validate', '--data-dir', str(data), '--checkpoint', str(out / 'best.safetensors'), '--workers', '0',
                 '--results-file', str(results), '--per-class', '--confusion-matrix', '--no-progress'])
    assert code == 0
    r = json.loads(results.read_text())
    assert {'top1', 'top5', 'loss', 'img_size'} <= set(r)
    assert r['img_size'] == 32 and r['count'] == 6 and r['model'] == 'epsanet50'  # recorded in the checkpoint
    assert r['top5'] == 100.0  # 3 classes: top-5 is top-3
    matrix = np.array(r['confusion_matrix'])
    assert matrix.shape == (3, 3) and matrix.sum() == 6 and r['classes'] == ['a', 'b', 'c']
    assert r['top1'] == pytest.approx(100 * np.trace(matrix) / 6)
    assert set(r['per_class']) == {'a', 'b', 'c'}
    assert f'top-1 {r["top1"]:.2f}%' in capsys.readouterr().out


def test_extract_cli_prelogits_and_stages(trained, tmp_path):
    data, out = trained
    ckpt = str(out / 'best.safetensors')
    args = ['extract', '--data-dir', str(data / 'val'), '--checkpoint', ckpt, '--workers', '0', '--no-progress',
            '-b', '4']
    assert main(args + ['--output', str(tmp_path / 'f.safetensors')]) == 0
    feats = load_file(tmp_path / 'f.safetensors')['features']
    assert feats.shape == (6, 2048)
    paths = (tmp_path / 'f.paths.txt').read_text().splitlines()
    assert paths == ['a/0.png', 'a/1.png', 'b/0.png', 'b/1.png', 'c/0.png', 'c/1.png']
    assert main(args + ['--output', str(tmp_path / 's.npy'), '--stages', '2', '4']) == 0
    assert np.load(tmp_path / 's.stage2.npy').shape == (6, 512, 4, 4)
    assert np.load(tmp_path / 's.stage4.npy').shape == (6, 2048, 1, 1)


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


def test_torchrun_two_cpu_processes(trained, tmp_path):
    data, _ = trained
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'epsanet', 'train', '--data-dir', str(data), '--output', str(out), '--img-size', '32', '-b', '2',
           '--epochs', '1', '--workers', '0', '--opt', 'sgd', '--lr', '0.01', '--warmup-epochs', '0', '--crop-pct', '1',
           '--no-progress', '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count('on cpu (2 processes)') == 1  # rank 0 logs alone
    assert proc.stdout.count('Best top-1') == 1
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 1 and 0 <= rows[0]['val_top1'] <= 100
    assert sorted(p.name for p in out.iterdir()) == [
        'args.yaml', 'best.safetensors', 'last.safetensors', 'last.state.pth', 'metrics.csv', 'metrics.json',
        'metrics.png']
