import logging

import pytest
import torch
from PIL import Image

from epsanet.data import (
    DataError,
    ImageFiles,
    ImageFolder,
    UnreadableImageError,
    check_same_classes,
    find_images,
    split_dir,
    write_image_folder,
)


def test_image_folder_reads_classes_in_order(tmp_path):
    root = write_image_folder(tmp_path, classes=('cat', 'ant', 'bee'), splits={'train': 2}, size=8)
    ds = ImageFolder(root / 'train')
    assert ds.classes == ['ant', 'bee', 'cat']
    assert len(ds) == 6 and sorted(set(ds.targets)) == [0, 1, 2]
    img, target = ds[0]
    assert img.mode == 'RGB' and target == 0


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        split_dir(tmp_path / 'nope', 'train')


def test_missing_split_lists_what_is_there(tmp_path):
    (tmp_path / 'training').mkdir()
    with pytest.raises(DataError, match='no "train" subfolder.*training'):
        split_dir(tmp_path, 'train')


def test_empty_split(tmp_path):
    (tmp_path / 'train').mkdir()
    with pytest.raises(DataError, match='no class subfolders .*empty'):
        ImageFolder(tmp_path / 'train')


def test_images_without_class_folders(tmp_path):
    (tmp_path / 'train').mkdir()
    Image.new('RGB', (4, 4)).save(tmp_path / 'train' / 'x.png')
    with pytest.raises(DataError, match='1 images lie directly in it'):
        ImageFolder(tmp_path / 'train')


def test_empty_class_folder(tmp_path):
    root = write_image_folder(tmp_path, classes=('a',), splits={'train': 1}, size=8)
    (root / 'train' / 'b').mkdir()
    (root / 'train' / 'b' / 'notes.txt').write_text('no images here')
    with pytest.raises(DataError, match='hold no images \\(b\\)'):
        ImageFolder(root / 'train')


def test_classes_differ_between_splits(tmp_path):
    write_image_folder(tmp_path, classes=('a', 'b'), splits={'train': 1}, size=8)
    write_image_folder(tmp_path, classes=('a', 'c'), splits={'val': 1}, size=8)
    train, val = ImageFolder(tmp_path / 'train'), ImageFolder(tmp_path / 'val')
    with pytest.raises(DataError, match='only in .*train: b; only in .*val: c'):
        check_same_classes(train.classes, val.classes, train.root, val.root)
    check_same_classes(train.classes, train.classes, train.root, train.root)


def _corrupt(path):
    path.write_bytes(b'\x89PNG\r\n\x1a\n garbage')


def test_corrupt_image_is_skipped_counted_and_logged(tmp_path, caplog):
    root = write_image_folder(tmp_path, classes=('a', 'b'), splits={'train': 2}, size=8)
    bad = root / 'train' / 'a' / '0.png'
    _corrupt(bad)
    ds = ImageFolder(root / 'train')
    with caplog.at_level(logging.WARNING):
        img, target = ds[0]
    assert img.size == (8, 8) and target == 0  # the next readable sample, a/1.png
    assert ds.num_skipped == 1
    assert str(bad) in caplog.text
    assert [p for p, _ in ds.verify(progress=False)] == [str(bad)]
    ds.reset_skipped()
    assert ds.num_skipped == 0


def test_skips_are_counted_across_worker_processes(tmp_path):
    root = write_image_folder(tmp_path, classes=('a', 'b'), splits={'train': 3}, size=8)
    _corrupt(root / 'train' / 'a' / '1.png')
    _corrupt(root / 'train' / 'b' / '2.png')
    ds = ImageFolder(root / 'train', transform=lambda im: torch.zeros(1))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sum(len(t) for _, t in loader) == 6
    assert ds.num_skipped == 2


def test_strict_raises_naming_the_file(tmp_path):
    root = write_image_folder(tmp_path, classes=('a',), splits={'train': 1}, size=8)
    _corrupt(root / 'train' / 'a' / '0.png')
    with pytest.raises(UnreadableImageError, match='0.png'):
        ImageFolder(root / 'train', strict=True)[0]


def test_image_files_marks_unreadable_instead_of_replacing(tmp_path):
    root = write_image_folder(tmp_path, classes=('a',), splits={'x': 2}, size=8)
    _corrupt(root / 'x' / 'a' / '0.png')
    paths = find_images(root)
    assert [p.name for p in paths] == ['0.png', '1.png']
    ds = ImageFiles(paths)
    assert ds[0][1] == -1 and ds[1][1] == 1
