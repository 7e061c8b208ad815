import json

import numpy as np
from PIL import Image

from epsanet.data import ImageFolder, write_digits


def test_digits_image_folder(tmp_path):
    root = write_digits(tmp_path / 'digits', size=8)
    train, val = ImageFolder(root / 'train'), ImageFolder(root / 'val')
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797  # every scan scikit-learn ships
    assert abs(len(val) / 1797 - 0.2) < 0.01
    first = Image.open(train.samples[0][0])
    assert first.mode == 'L' and first.size == (8, 8) and np.asarray(first).max() > 100
    assert json.loads((root / 'digits.json').read_text())['size'] == 8
    # a second call with the same arguments reuses the folder
    stamp = (root / 'digits.json').stat().st_mtime_ns
    assert write_digits(root, size=8) == root and (root / 'digits.json').stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
