"""``epsanet validate`` through the command line."""
import json

import numpy as np
import pytest

from epsanet.cli import main
from epsanet.data import write_image_folder


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


def test_validate_refuses_other_classes(trained, tmp_path, capsys):
    _, out = trained
    other = write_image_folder(tmp_path / 'other', classes=('a', 'b', 'x'), splits={'val': 1})
    assert main(['validate', '--data-dir', str(other), '--checkpoint', str(out / 'best.safetensors')]) == 2
    assert 'are not the classes' in capsys.readouterr().err
