"""A small real image data set on disk: scikit-learn's handwritten digits as an ImageFolder.

scikit-learn ships the 1,797 8x8 grey digit scans of the UCI "Optical Recognition of
Handwritten Digits" set inside its package, so nothing is downloaded. :func:`write_digits`
writes them as PNG files, ``root/{train,val}/{0..9}/<index>.png``, with a stratified split.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

__all__ = ['write_digits']

_MARKER = 'digits.json'


def write_digits(root: Union[str, os.PathLike], size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits as an ImageFolder under ``root`` and return ``root``.

    Each 8x8 scan (values 0-16) is scaled to 0-255 and resized to ``size`` x ``size`` with
    bicubic interpolation. Re-running with the same arguments reuses the existing folder; the
    folder is built in a temporary sibling and renamed into place, so it is never half written.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError('the digits data set comes with scikit-learn: pip install scikit-learn') from e

    root = Path(root)
    params = dict(size=size, val_fraction=val_fraction, seed=seed)
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if root.exists():
        shutil.rmtree(root)

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, stratify=digits.target, random_state=seed)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        for split, idx in (('train', train_idx), ('val', val_idx)):
            for i in sorted(idx):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i], mode='L').resize((size, size), Image.BICUBIC)
                img.save(folder / f'{i:04d}.png')
        (tmp / _MARKER).write_text(json.dumps(params))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
