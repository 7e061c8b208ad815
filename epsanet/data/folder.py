"""ImageFolder data sets (``root/<split>/<class>/<image>``) with clear errors and safe loading.

The reader is torchvision's folder scan; what this module adds is what a user needs when the
data is not perfect: an error that says what is wrong with the folder, images in any mode
converted to RGB (:func:`~epsanet.data.image.load_image`), and unreadable files skipped with
their path logged and counted (or, with ``strict=True``, a failure naming them).
"""
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import EpsanetError
from ..progress import progress as progress_bar
from .image import UNREADABLE_ERRORS, load_image

__all__ = [
    'DataError', 'UnreadableImageError', 'ImageFiles', 'ImageFolder', 'find_images', 'split_dir', 'check_same_classes',
    'verify_files', 'unreadable_error', 'unreadable_target', 'skipped_index',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class DataError(EpsanetError, ValueError):
    """The data on disk is not usable as given; the message says what to change."""


class UnreadableImageError(DataError):
    """An image file could not be decoded (raised with ``strict=True``)."""


def unreadable_target(index: int) -> int:
    """The target a sample gets when its image cannot be read: ``-1 - index`` (always negative).

    Evaluation, prediction and extraction drop such samples from every metric and output and
    recover the index with :func:`skipped_index` to name the file.
    """
    return -1 - int(index)


def skipped_index(target: int) -> int:
    """The sample index encoded in an :func:`unreadable_target`."""
    return -1 - int(target)


def is_image_file(path: PathLike) -> bool:
    return str(path).lower().endswith(IMG_EXTENSIONS)


def find_images(root: PathLike) -> List[Path]:
    """Every image file under ``root`` (recursively, following links), sorted by path.

    Each file and each folder is counted once, however many links lead to it: a link to a folder already
    scanned is not followed again, and one that leads back into its own ancestors (a loop such as
    ``ln -s .. up``) is reported with a warning naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root} is not a directory: pass the folder that holds the images.')
    found = []
    seen_dirs, seen_files = set(), set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable_folder, followlinks=True):
        here = Path(dirpath)
        ancestors = {_identity(p) for p in (here, *here.parents)}
        seen_dirs.add(_identity(here))
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith('.')):
            ident = _identity(here / d)
            if ident is None:
                continue
            if ident in ancestors:
                _logger.warning('symlink loop: %s leads back to %s; not followed.', here / d,
                                os.path.realpath(here / d))
            elif ident not in seen_dirs:
                seen_dirs.add(ident)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith('.') or not is_image_file(f):
                continue
            ident = _identity(here / f)
            if ident is None or ident not in seen_files:  # a broken link is kept: reading it reports it
                seen_files.add(ident)
                found.append(here / f)
    return sorted(found)


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    """(device, inode) of what ``path`` leads to, or None when it leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unreadable_folder(e: OSError) -> None:
    """``os.walk`` skips a folder it cannot list; say so instead of reporting it as empty."""
    raise DataError(f'cannot read the folder {e.filename}: {e.strerror or e}.') from e


class MissingSplitError(DataError):
    """The data folder has no subfolder of the split's name."""


def split_dir(data_dir: PathLike, split: str) -> Path:
    """``data_dir/split``, or a :class:`DataError` that says what the folder looks like instead."""
    data_dir = Path(data_dir)
    if not str(data_dir) or not data_dir.exists():
        raise DataError(f'data dir {data_dir} does not exist: pass --data-dir pointing to a folder with '
                        f'{split}/<class>/<image> inside.')
    if not data_dir.is_dir():
        raise DataError(f'data dir {data_dir} is a file, not a folder.')
    path = data_dir / split
    if not path.is_dir():
        present = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith('.'))
        hint = f'it has the subfolders: {", ".join(present)}' if present else 'it has no subfolders'
        raise MissingSplitError(f'data dir {data_dir} has no "{split}" subfolder ({hint}). Expected the layout '
                                f'{data_dir}/{split}/<class>/<image>.')
    return path


def _scan_classes(root: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if not classes:
        what = f'{len(loose)} images lie directly in it' if loose else 'it is empty'
        raise DataError(f'{root} has no class subfolders ({what}). Put the images of each class in their own '
                        f'subfolder: {root}/<class>/<image>.')
    if loose:
        _logger.warning('%d images lie directly in %s, outside any class folder: they are ignored.', len(loose), root)
    samples, empty = [], []
    for index, name in enumerate(classes):
        images = find_images(root / name)
        if not images:
            empty.append(name)
        samples.extend((str(p), index) for p in images)
    if empty:
        raise DataError(f'{len(empty)} class folders of {root} hold no images ({", ".join(empty[:10])}'
                        f'{", ..." if len(empty) > 10 else ""}); add images or remove the folders. '
                        f'Image files end with one of {", ".join(IMG_EXTENSIONS)}.')
    return classes, samples


def _apply_class_map(root: Path, classes: List[str], samples: List[Tuple[str, int]],
                     class_map: Union[str, dict]) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Re-index ``samples`` with timm's class map; every class folder must be in the map."""
    from timm.data.readers.class_map import load_class_map

    try:
        mapping = load_class_map(class_map, root=str(root))
    except (AssertionError, OSError, ValueError) as e:
        raise DataError(f'cannot read the class map {class_map}: {e}. A class map is a text file with one class '
                        'name per line (line i = class index i).') from e
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise DataError(f'the class folders {", ".join(missing[:10])} of {root} are not in the class map {class_map}; '
                        'add them to the map or remove the folders.')
    new_classes = [None] * (max(mapping.values()) + 1)
    for name, i in mapping.items():
        new_classes[i] = name
    if any(c is None for c in new_classes):
        raise DataError(f'the class map {class_map} leaves class indices unused; number the classes 0..N-1.')
    return new_classes, [(p, mapping[classes[t]]) for p, t in samples]


def unreadable_error(bad: Sequence[Tuple[str, str]], where: PathLike) -> UnreadableImageError:
    """The ``--strict`` error listing unreadable files (``bad`` from :func:`verify_files`)."""
    listing = '\n'.join(f'  {p}: {reason}' for p, reason in bad[:20])
    more = f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else ''
    return UnreadableImageError(f'{len(bad)} unreadable images under {where} (--strict):\n{listing}{more}\n'
                                'Remove or replace them, or drop --strict to skip and count them.')


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], train_root: PathLike,
                       val_root: PathLike) -> None:
    """Raise a :class:`DataError` naming the classes that only one split has."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    parts = []
    if only_train:
        parts.append(f'only in {train_root}: {", ".join(only_train)}')
    if only_val:
        parts.append(f'only in {val_root}: {", ".join(only_val)}')
    raise DataError(f'the train and val splits have different classes ({"; ".join(parts)}). Both splits need '
                    'the same class folders, or the labels would not mean the same thing.')


class SkipCounter:
    """Counts unreadable images a data set skipped, across DataLoader worker processes, and remembers
    which were already logged (once per process). Call :meth:`_init_skips` in ``__init__``."""

    def _init_skips(self) -> None:
        self._skipped = multiprocessing.Value('i', 0)
        self._logged = set()

    @property
    def num_skipped(self) -> int:
        """How many times an unreadable image was skipped since the last :meth:`reset_skipped`."""
        return self._skipped.value

    def reset_skipped(self) -> None:
        with self._skipped.get_lock():
            self._skipped.value = 0

    def _count_skip(self) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1


class ImageFolder(SkipCounter, Dataset):
    """``root/<class>/<image>`` as (image, class index) samples, classes in sorted folder order.

    Unreadable files: with ``strict=False`` the path is logged once per process and
    :attr:`num_skipped` counts every skip (shared across DataLoader worker processes); the sample is
    replaced by the next readable one (training), or with ``mark_unreadable=True`` it comes back as
    a blank image with the target :func:`unreadable_target` so that evaluation can leave it out of
    every metric. With ``strict=True`` an :class:`UnreadableImageError` is raised.
    ``class_map``: timm's class map (a text file with one class name per line, or a dict name ->
    index) to fix the class order; by default classes are the sorted folder names.
    ``transform`` is set by timm's ``create_loader``.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable] = None, strict: bool = False,
                 mark_unreadable: bool = False, class_map: Union[str, dict, None] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f'{self.root} does not exist or is not a folder.')
        self.classes, self.samples = _scan_classes(self.root)
        if class_map:
            self.classes, self.samples = _apply_class_map(self.root, self.classes, self.samples, class_map)
        self.mark_unreadable = mark_unreadable
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.strict = strict
        self._init_skips()

    def __len__(self) -> int:
        return len(self.samples)

    def filename(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            img = _load_or_skip(path, self.strict, log=path not in self._logged)
            if img is None:
                self._logged.add(path)
                self._count_skip()
                if self.mark_unreadable:
                    img, target = Image.new('RGB', (32, 32)), unreadable_target(index)
                else:
                    continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise DataError(f'none of the {len(self.samples)} images under {self.root} can be read.')

    def verify(self, progress: bool = True) -> List[Tuple[str, str]]:
        """Decode every image once; return ``(path, reason)`` for those that fail."""
        return verify_files([p for p, _ in self.samples], desc=f'checking {self.root.name}', progress=progress)


def verify_files(paths: Sequence[PathLike], desc: str = 'checking images',
                 progress: bool = True) -> List[Tuple[str, str]]:
    """Decode every image once; return ``(path, reason)`` for those that fail."""
    bad = []
    for path in progress_bar(paths, desc=desc, unit='img', enabled=progress):
        try:
            load_image(path)
        except UNREADABLE_ERRORS as e:
            bad.append((str(path), str(e)))
    return bad


class ImageFiles(Dataset):
    """A flat list of image files as ``(image, index)`` samples, for feature extraction.

    Unlike :class:`ImageFolder`, an unreadable file is not replaced by another image: its sample
    comes back with the negative index :func:`unreadable_target` (and a blank image) so the caller
    can drop it and name its path.
    """

    def __init__(self, paths: Sequence[PathLike], transform: Optional[Callable] = None, strict: bool = False):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        img = _load_or_skip(path, self.strict)
        if img is None:
            img, index = Image.new('RGB', (32, 32)), unreadable_target(index)
        return (self.transform(img) if self.transform is not None else img), index


def _load_or_skip(path: str, strict: bool, log: bool = True) -> Optional[Image.Image]:
    """The image at ``path`` as RGB, or ``None`` (logged) when it cannot be read; ``strict`` raises."""
    try:
        return load_image(path)
    except UNREADABLE_ERRORS as e:
        if strict:
            raise UnreadableImageError(f'cannot read image {path} ({e}); remove or replace it, '
                                       'or drop --strict to skip unreadable images') from e
        if log:
            _logger.warning('skipped unreadable image %s (%s)', path, e)
        return None
