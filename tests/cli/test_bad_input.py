"""Bad input, table-driven, through the installed ``epsanet`` console script in real processes.

Every case asserts three things: the exit status, a short message without ``Traceback``, and that the
sha256 of every file that existed before is unchanged. The classes here are the output policy
(:mod:`epsanet.app.outputs`: data loss) and the data checks; concurrent runs, signals and a full disk
are in ``test_bad_input_runs.py``. Inputs are tiny: 16 px images, a ``test_resnet`` checkpoint with 2
classes.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from epsanet.data import write_image_folder
from epsanet.train.checkpoint import save_weights

pytestmark = pytest.mark.slow

EPSANET = Path(sys.executable).parent / 'epsanet'
TRAIN = ['train', '--model', 'test_resnet', '--img-size', '32', '-b', '2', '--epochs', '1', '--workers', '0',
         '--no-progress', '--opt', 'sgd', '--lr', '0.01', '--warmup-epochs', '0']


def run(argv: List[str], cwd: Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.run([str(EPSANET), *argv], cwd=cwd, env=env, capture_output=True, timeout=timeout, **kwargs)


def snapshot(root: Path) -> Dict[str, str]:
    """sha256 of every file under ``root`` (links not followed), by path."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def check(result: subprocess.CompletedProcess, status: int, message: Optional[str] = None, max_lines: int = 3) -> str:
    """The exit status, a message, no traceback; returns stderr. Refusals must fit in ``max_lines``."""
    err = result.stderr.decode('utf-8', 'replace')
    out = result.stdout.decode('utf-8', 'replace')
    assert result.returncode == status, f'exit {result.returncode}, expected {status}\n{out}\n{err}'
    assert 'Traceback' not in err + out, err
    if message is not None:
        assert message in err, err
    if status != 0:
        lines = [line for line in err.splitlines() if line.startswith('epsanet ')]
        assert 1 <= len(lines) <= max_lines, err
    return err


@pytest.fixture(scope='module')
def world(tmp_path_factory) -> Path:
    """data/ (train, val: classes a, b), ck.safetensors, files of the user's, a finished run folder."""
    root = tmp_path_factory.mktemp('bad-input')
    write_image_folder(root / 'data', classes=('a', 'b'), splits={'train': 3, 'val': 2}, size=16)
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=2)
    save_weights(root / 'ck.safetensors', model.state_dict(),
                 dict(model='test_resnet', num_classes=2, classes=['a', 'b'], img_size=32, crop_pct=1.0))
    np.save(root / 'mydata.npy', np.arange(10))
    for name in ('user.json', 'user.csv', 'user.onnx', 'user.md'):
        (root / name).write_text(f'the user\'s {name}\n')
    (root / 'notes').mkdir()
    (root / 'notes' / 'todo.txt').write_text('mine\n')
    (root / 'ex').mkdir()
    Image.new('RGB', (8, 8)).save(root / 'ex' / '0.png')  # explain would write ex/0.png for data/val/a/0.png
    run_dir = root / 'run1'
    run_dir.mkdir()
    (run_dir / 'args.yaml').write_text('model: test_resnet\n')
    (run_dir / 'last.state.pth').write_bytes(b'state')
    (run_dir / 'best.safetensors').write_bytes(b'weights')
    return root


CK = ['--checkpoint', 'ck.safetensors']
# (id, argv, exit status, part of the message)
OUTPUT_CASES = [
    ('extract-onto-checkpoint', ['extract', *CK, '--data-dir', 'data', '--output', 'ck.safetensors'], 2,
     'that this command reads'),
    ('extract-over-users-npy', ['extract', *CK, '--data-dir', 'data', '--output', 'mydata.npy'], 2,
     'already exists and this command did not make it'),
    ('extract-into-data-folder', ['extract', *CK, '--data-dir', 'data', '--output', 'data'], 2,
     'that this command reads'),
    ('validate-results-onto-checkpoint', ['validate', *CK, '--data-dir', 'data', '--results-file', 'ck.safetensors'],
     2, 'that this command reads'),
    ('validate-results-over-users-file', ['validate', *CK, '--data-dir', 'data', '--results-file', 'user.json'], 2,
     '--overwrite'),
    ('predict-results-over-users-file', ['predict', 'data/val', *CK, '--results-file', 'user.csv'], 2, '--overwrite'),
    ('explain-into-its-input-folder', ['explain', 'data/val', *CK, '--output-dir', 'data/val'], 2,
     'that this command reads'),
    ('explain-into-a-folder-holding-an-input', ['explain', 'data/val/a/0.png', *CK, '--output-dir', 'data/val/a'], 2,
     'holds the input'),
    ('explain-over-an-existing-picture', ['explain', 'data/val/a', *CK, '--output-dir', 'ex'], 2, '--overwrite'),
    ('export-onto-its-weights', ['export', 'test_resnet', '--num-classes', '2', '--weights', 'ck.safetensors', '-o',
                                 'ck.safetensors'], 2, 'that this command reads'),
    ('export-over-users-file', ['export', 'test_resnet', '-o', 'user.onnx'], 2, '--overwrite'),
    ('quantize-onto-checkpoint', ['quantize', *CK, '--data-dir', 'data', '-o', 'ck.safetensors'], 2,
     'that this command reads'),
    ('quantize-results-over-users-file', ['quantize', *CK, '--data-dir', 'data', '--results-file', 'user.json'], 2,
     '--overwrite'),
    ('convert-into-the-folder-of-its-source', ['convert', 'ck.safetensors', '.', '--overwrite'], 2, 'holds the input'),
    ('benchmark-json-over-users-file', ['benchmark', '--json', 'user.json'], 2, '--overwrite'),
    ('benchmark-markdown-over-users-file', ['benchmark', '--json', 'new.json', '--markdown', 'user.md'], 2,
     '--overwrite'),
    ('train-into-an-existing-run', [*TRAIN, '--data-dir', 'data', '--output', 'run1'], 2, '--resume run1'),
    ('train-output-is-a-file', [*TRAIN, '--data-dir', 'data', '--output', 'user.json'], 2, 'is a file'),
    ('train-into-a-folder-of-other-files', [*TRAIN, '--data-dir', 'data', '--output', 'notes'], 2, 'no run to resume'),
    ('train-into-the-folder-of-its-initial-checkpoint', [*TRAIN, '--data-dir', 'data', '--output', '.',
                                                         '--initial-checkpoint', 'ck.safetensors', '--overwrite'], 2,
     'holds the input'),
    ('train-into-its-data', [*TRAIN, '--data-dir', 'data', '--output', 'data/train', '--overwrite'], 2,
     'lies inside the input folder data'),
    ('train-into-a-new-folder-in-its-data', [*TRAIN, '--data-dir', 'data', '--output', 'data/runs/1'], 2,
     'lies inside the input folder data'),
    ('train-overwrite-but-set-up-fails', [*TRAIN, '--data-dir', 'data', '--output', 'run1', '--overwrite', '--model',
                                          'nosuch_model'], 2, 'nosuch_model'),
    ('train-new-folder-set-up-fails', [*TRAIN, '--data-dir', 'data', '--output', 'newrun', '--model', 'nosuch_model'],
     2, 'nosuch_model'),
]


@pytest.mark.parametrize('argv, status, message', [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_output_policy_refuses_and_destroys_nothing(world, argv, status, message):
    before = snapshot(world)
    check(run(argv, world), status, message)
    assert snapshot(world) == before  # nothing changed, and nothing new was written
    assert not (world / 'newrun').exists()


def test_the_refusal_of_an_existing_run_names_a_command_that_resumes_it(world, tmp_path):
    data = world / 'data'
    argv = [*TRAIN, '--data-dir', str(data), '--output', 'run']
    check(run(argv, tmp_path), 0)
    before = snapshot(tmp_path)
    err = check(run([*argv, '--epochs', '2'], tmp_path), 2, 'Resume it with: ')
    assert snapshot(tmp_path) == before
    command = err.split('Resume it with: ')[1].split('   ')[0].split()
    assert command[:2] == ['epsanet', 'train'] and '--overwrite' in err
    check(run([*command[1:], '--epochs', '2'], tmp_path), 0)  # the printed command works (args.yaml has epochs 1)
    assert json.loads((tmp_path / 'run' / 'metrics.json').read_text())[-1]['epoch'] == 2
    assert (tmp_path / 'run' / 'best.safetensors').is_file()
    check(run([*argv, '--overwrite'], tmp_path), 0)  # the flag that starts over: a fresh one-epoch run
    assert len(json.loads((tmp_path / 'run' / 'metrics.json').read_text())) == 1


# ---- data ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def odd_data(world) -> Path:
    """loop/: a symlink loop and a second link to one image; nan/: a float TIFF with a NaN pixel;
    one/: a single class; names/: a file name that is not valid UTF-8."""
    root = world.parent / 'odd'
    loop = write_image_folder(root / 'loop', classes=('a', 'b'), splits={'val': 2}, size=16)
    os.symlink('..', loop / 'val' / 'a' / 'up')
    os.symlink('0.png', loop / 'val' / 'b' / 'again.png')
    nan = write_image_folder(root / 'nan', classes=('a', 'b'), splits={'val': 2}, size=16)
    pixels = np.full((16, 16), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode='F').save(nan / 'val' / 'a' / 'bad.tif')
    write_image_folder(root / 'one', classes=('a',), splits={'train': 4, 'val': 2}, size=16)
    names = write_image_folder(root / 'names', classes=('a', 'b'), splits={'val': 1}, size=16)
    os.rename(names / 'val' / 'a' / '0.png', os.fsencode(names / 'val' / 'a') + b'/caf\xe9.png')
    return root


def test_a_symlink_loop_is_reported_and_each_image_counted_once(world, odd_data):
    before = snapshot(odd_data)
    result = run(['validate', '--checkpoint', str(world / 'ck.safetensors'), '--data-dir', str(odd_data / 'loop'),
                  '--workers', '0', '--no-progress', '--results-file', 'loop.json'], world.parent)
    err = check(result, 0)
    assert 'symlink loop' in err and str(Path('val') / 'a' / 'up') in err
    assert json.loads((world.parent / 'loop.json').read_text())['count'] == 4  # not 4 + the loop + the second link
    assert snapshot(odd_data) == before


@pytest.mark.parametrize('command', ['predict', 'validate', 'extract'])
def test_a_nan_pixel_makes_an_image_unreadable(world, odd_data, command, tmp_path):
    data = odd_data / 'nan' / 'val'
    before = snapshot(odd_data)
    argv = {'predict': ['predict', str(data), '--results-file', str(tmp_path / 'p.json')],
            'validate': ['validate', '--data-dir', str(odd_data / 'nan'), '--results-file', str(tmp_path / 'v.json')],
            'extract': ['extract', '--data-dir', str(data), '--output', str(tmp_path / 'f.npy')]}[command]
    result = run([*argv, '--checkpoint', str(world / 'ck.safetensors'), '--workers', '0', '--no-progress'], tmp_path)
    err = check(result, 0)
    assert 'bad.tif' in err and 'not finite' in err
    if command == 'predict':
        rows = json.loads((tmp_path / 'p.json').read_text())
        assert len(rows) == 4 and not any('bad.tif' in r['filename'] for r in rows)
    elif command == 'validate':
        results = json.loads((tmp_path / 'v.json').read_text())
        assert results['count'] == 4 and results['skipped_unreadable'] == 1
    else:
        assert np.load(tmp_path / 'f.npy').shape[0] == 4
        assert any('bad.tif' in s for s in json.loads((tmp_path / 'f.index.json').read_text())['skipped'])
    assert snapshot(odd_data) == before


def test_training_on_one_class_is_refused(odd_data, tmp_path):
    check(run([*TRAIN, '--data-dir', str(odd_data / 'one'), '--output', 'run'], tmp_path), 2, 'one class')
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('suffix', ['.csv', '.json'])
def test_names_that_are_not_utf8_are_kept_losslessly(world, odd_data, suffix, tmp_path):
    out = tmp_path / f'p{suffix}'
    result = run(['predict', str(odd_data / 'names' / 'val'), *CK[:1], str(world / 'ck.safetensors'), '--workers',
                  '0', '--no-progress', '--results-file', str(out)], tmp_path)
    check(result, 0)
    raw = os.fsencode(odd_data / 'names' / 'val' / 'a') + b'/caf\xe9.png'
    if suffix == '.csv':
        lines = out.read_bytes().splitlines()[1:]
        assert len(lines) == 2 and any(line.startswith(raw + b',') for line in lines)
    else:
        rows = json.loads(out.read_text())
        assert len(rows) == 2 and raw in [os.fsencode(r['filename']) for r in rows]
