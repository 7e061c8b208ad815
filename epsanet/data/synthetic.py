"""Tiny synthetic ImageFolders for smoke runs and tests: coloured noise, one colour per class."""
import os
from pathlib import Path
from typing import Dict, Sequence, Union

import numpy as np
from PIL import Image

__all__ = ['write_image_folder']


def write_image_folder(
        root: Union[str, os.PathLike],
        classes: Sequence[str] = ('a', 'b', 'c'),
        splits: Dict[str, int] = None,
        size: int = 32,
        seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/<i>.png`` with ``splits[split]`` images per class; return ``root``.

    Each class has its own mean colour plus noise, so a model can learn it in a few steps.
    """
    root = Path(root)
    splits = splits or {'train': 4, 'val': 2}
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (len(classes), 3))
    for split, count in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0, 30, (size, size, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root
