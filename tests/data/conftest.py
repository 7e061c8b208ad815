"""A tiny ImageFolder with one corrupt image, written once per module."""
import pytest

from epsanet.data import write_image_folder

CLASSES = ('a', 'b', 'c')


def corrupt(path) -> None:
    path.write_bytes(b'\x89PNG\r\n\x1a\n garbage')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """train: 2 per class, val: 3 per class, 16 px; val/b/1.png is corrupt."""
    root = write_image_folder(tmp_path_factory.mktemp('src'), classes=CLASSES, splits={'train': 2, 'val': 3}, size=16)
    corrupt(root / 'val' / 'b' / '1.png')
    return root
