"""One entry point for every data source: :func:`create_image_dataset`.

The source is named as in timm's ``--dataset`` flag and read through timm's readers
(``timm.data.create_dataset`` / ``create_reader``):

* ``''`` (empty): an ImageFolder ``root/<split>/<class>/<image>`` (this package's
  :class:`~epsanet.data.ImageFolder`, with its clear errors), or a ``.tar`` file (or a folder of
  ``.tar`` files) of ``<class>/<image>`` members;
* ``hfds/NAME``: a Hugging Face ``datasets`` data set: a local ``save_to_disk`` folder, a local
  folder of parquet/image files or a local script, or a Hub name (a download; not offline);
* ``wds/NAME``: webdataset shards under ``root`` (``<split>-{0000..0009}.tar`` with ``_info.json``,
  timm's layout; class names from ``class_map`` or a ``classes`` list in the info file). Training
  streams them through timm (shuffle buffers, shards split over processes and workers); every other
  use (validation, prediction, extraction, evaluation during training) indexes the tar shards once
  and reads them by sample (:class:`~epsanet.data.shards.ShardReader`), named ``<shard>/<key>.<ext>``;
* ``torch/NAME``: a torchvision data set (``torch/mnist``, ``torch/cifar10``, ...); downloaded
  only with ``download=True`` (``--dataset-download``).

Every map-style source decodes images with :func:`~epsanet.data.load_image` (any PIL mode to RGB).
An unreadable image is logged with its name and counted; in training it is replaced by the next
readable sample, in evaluation (``mark_unreadable=True``) it comes back with the negative target
:func:`~epsanet.data.folder.unreadable_target` so that it enters no metric and no output row.
``strict=True`` makes it an error. In training, streamed webdataset shards are the exception:
timm's pipeline logs and drops a sample it cannot decode, so it is not counted there.
"""
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from PIL import Image
from timm.data import IterableImageDataset
from torch.utils.data import Dataset

from .folder import DataError, ImageFolder, SkipCounter, UnreadableImageError, split_dir, unreadable_target
from .image import UNREADABLE_ERRORS, to_rgb

__all__ = [
    'create_image_dataset', 'IndexedSamples', 'ReaderDataset', 'ShardDataset', 'dataset_classes', 'SOURCE_PREFIXES',
]

_logger = logging.getLogger(__name__)

SOURCE_PREFIXES = ('', 'hfds/', 'wds/', 'torch/')


def _prefix(name: str) -> str:
    head, sep, _ = name.partition('/')
    return head.lower() if sep else ''


class ReaderDataset(SkipCounter, Dataset):
    """A timm reader (``reader[i] -> (file object or PIL image, target)``) as ``(image, target)`` samples.

    Like :class:`~epsanet.data.ImageFolder`: images converted to RGB with :func:`~epsanet.data.to_rgb`,
    unreadable ones logged, counted in :attr:`num_skipped`, replaced by the next one or marked
    (``mark_unreadable``), or an error with ``strict``. :attr:`classes` lists the class names.
    """

    def __init__(self, reader: Any, classes: List[str], where: str, transform: Optional[Callable] = None,
                 strict: bool = False, mark_unreadable: bool = False):
        self.reader = reader
        self.classes = list(classes)
        self.root = where
        self.transform = transform
        self.strict = strict
        self.mark_unreadable = mark_unreadable
        self._init_skips()

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        return str(self.reader.filename(index))

    def _decode(self, index: int):
        try:
            img, target = self.reader[index][:2]
            if not isinstance(img, Image.Image):
                with Image.open(img) as opened:
                    opened.load()
                    img = opened.copy()
            return to_rgb(img), target
        except UNREADABLE_ERRORS as e:
            name = self._safe_filename(index)
            if self.strict:
                raise UnreadableImageError(f'cannot read image {name} of {self.root} ({e}); remove or replace it, '
                                           'or drop --strict to skip unreadable images') from e
            if name not in self._logged:
                _logger.warning('skipped unreadable image %s of %s (%s)', name, self.root, e)
                self._logged.add(name)
            self._count_skip()
            return None, None

    def _safe_filename(self, index: int) -> str:
        try:
            return self.filename(index)
        except Exception:  # some readers cannot name a sample
            return f'sample {index}'

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            img, target = self._decode((index + attempt) % len(self))
            if img is None:
                if not self.mark_unreadable:
                    continue
                img, target = Image.new('RGB', (32, 32)), unreadable_target(index)
            if self.transform is not None:
                img = self.transform(img)
            return img, int(target)
        raise DataError(f'none of the {len(self)} images of {self.root} can be read.')

    def verify(self, progress: bool = True):
        """Decode every image once; return ``(name, reason)`` for those that fail."""
        from ..progress import progress as bar

        bad = []
        strict, self.strict = self.strict, True
        try:
            for i in bar(range(len(self)), desc=f'checking {self.root}', enabled=progress):
                try:
                    self._decode(i)
                except UnreadableImageError as e:
                    bad.append((self._safe_filename(i), str(e.__cause__ or e)))
        finally:
            self.strict = strict
        return bad


class IndexedSamples(Dataset):
    """``(image, index)`` samples of a random-access data set instead of ``(image, class)``; an unreadable
    image keeps its negative :func:`~epsanet.data.folder.unreadable_target` (built with
    ``mark_unreadable=True``). For outputs with one row per file (predict, extract): the row's
    file is ``dataset.filename(index)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    @property
    def transform(self):  # timm's create_loader sets the transform on the data set it is given
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return img, (index if target >= 0 else target)


class _TorchvisionReader:
    """A torchvision data set as a timm-style reader (PIL image or array, target)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.ds[index][:2]
        if not isinstance(img, Image.Image):
            import numpy as np
            img = Image.fromarray(np.asarray(img))
        return img, target

    def filename(self, index: int) -> str:
        samples = getattr(self.ds, 'samples', None)  # torchvision's folder data sets know their files
        if samples and isinstance(samples[index], (tuple, list)) and isinstance(samples[index][0], str):
            return samples[index][0]
        return f'{type(self.ds).__name__}[{index}]'


class _SavedHfReader:
    """A ``datasets`` ``save_to_disk`` folder as a timm-style reader (undecoded image bytes, label).
    With ``labels=False`` a data set without the label column is read too (every target 0)."""

    def __init__(self, path: str, split: str, image_key: str = 'image', label_key: str = 'label',
                 labels: bool = True):
        import datasets

        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f'the Hugging Face data set {path} has no split "{split}" (it has: '
                                f'{", ".join(loaded)}).')
            loaded = loaded[split]
        if not labels and label_key not in loaded.features:
            label_key = None
        for key in (image_key, label_key):
            if key is not None and key not in loaded.features:
                raise DataError(f'the Hugging Face data set {path} has no "{key}" column (columns: '
                                f'{", ".join(loaded.features)}).')
        self.ds = loaded.cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.label_key = image_key, label_key
        self.classes = []
        if label_key is not None:
            feature = loaded.features[label_key]
            self.classes = list(getattr(feature, 'names', None) or
                                [str(i) for i in range(max(self.ds[label_key]) + 1)])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        item = self.ds[index]
        image = item[self.image_key]
        data = image.get('bytes')
        target = item[self.label_key] if self.label_key is not None else 0
        return (io.BytesIO(data) if data else open(image['path'], 'rb')), target

    def filename(self, index: int) -> str:
        image = self.ds[index][self.image_key]
        return image.get('path') or f'{self.image_key}[{index}]'


def _classes_of(class_to_idx: Dict[str, int]) -> List[str]:
    names = [''] * (max(class_to_idx.values()) + 1 if class_to_idx else 0)
    for name, i in class_to_idx.items():
        names[i] = str(name)
    return names


def dataset_classes(dataset: Any) -> Optional[List[str]]:
    """Class names of a data set made by :func:`create_image_dataset` (None when the source has none)."""
    classes = getattr(dataset, 'classes', None)
    if classes:
        return list(classes)
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None)
    return _classes_of(mapping) if mapping else None


def create_image_dataset(
        name: str = '',
        root: Union[str, os.PathLike] = '',
        split: str = 'val',
        class_map: Union[str, dict, None] = None,
        download: bool = False,
        is_training: bool = False,
        strict: bool = False,
        mark_unreadable: bool = False,
        batch_size: int = 1,
        seed: int = 42,
        labels: bool = True,
        **kwargs: Any,
) -> Dataset:
    """A data set of ``(image, target)`` samples from any source named as timm's ``--dataset``.

    Args:
        name: ``''`` (folder or tar), ``hfds/NAME``, ``wds/NAME`` or ``torch/NAME`` (see the module doc).
        root: the data folder (``--data-dir``); for ``hfds/`` a local path may be given as NAME instead.
        split: the split (``train``, ``val``, ...); ``''`` uses ``root`` itself as an ImageFolder.
        class_map: timm's class map (text file, one class per line) fixing the class indices.
        download: allow torchvision (``torch/``) data sets to download (``--dataset-download``).
        is_training: training: ``wds/`` shards are streamed (shuffled) instead of indexed.
        strict: fail on an unreadable image instead of skipping it.
        mark_unreadable: evaluation: an unreadable image comes back with a negative target instead of
            being replaced (see :func:`~epsanet.data.folder.unreadable_target`).
        batch_size, seed: hints for streamed (``wds/``) data sets.
        labels: whether the samples need their labels. False (prediction, feature extraction) also takes
            unlabelled images of indexed ``wds/`` shards and saved ``hfds/`` data sets, with target 0.
        kwargs: passed to timm's reader (e.g. ``input_key``, ``target_key``; for indexed ``wds/`` shards
            these two only).

    Every source has ``classes`` (or a reader with ``class_to_idx``), ``num_skipped`` where it can
    count, and a ``filename(i)`` where it has random access.
    """
    prefix = _prefix(name)
    if prefix not in {p.rstrip('/') for p in SOURCE_PREFIXES}:
        raise DataError(f'--dataset {name}: unknown source "{prefix}/"; use "" (a folder or .tar), hfds/NAME, '
                        'wds/NAME or torch/NAME.')
    opts = dict(strict=strict, mark_unreadable=mark_unreadable)
    root = str(root) if root else ''
    if prefix == '':
        if not root:
            raise DataError('--data-dir is required: an ImageFolder root, a .tar file or a data set folder.')
        path = Path(root)
        if path.is_file() or (path.is_dir() and split and (path / f'{split}.tar').is_file()):
            return _tar_dataset(path if path.is_file() else path / f'{split}.tar', class_map, **opts)
        folder = split_dir(root, split) if split else Path(root)
        return ImageFolder(folder, class_map=class_map, **opts)
    if prefix == 'hfds':
        return _hfds_dataset(name.split('/', 1)[1], root, split, class_map, kwargs, labels, **opts)
    if prefix == 'torch':
        return _torch_dataset(name, root, split, download, **opts)
    if not is_training:
        return _indexed_wds_dataset(name, root, split, class_map, kwargs, labels, **opts)
    return _wds_dataset(name, root, split, class_map, is_training, batch_size, seed, kwargs)


def _tar_dataset(path: Path, class_map, **opts) -> ReaderDataset:
    from timm.data.readers import create_reader

    try:
        reader = create_reader('', root=str(path), class_map=class_map or '')
    except Exception as e:  # tarfile.ReadError, assertion of an empty tar, ...
        raise DataError(f'cannot read {path} as a tar file of <class>/<image> members ({type(e).__name__}: {e}).') \
            from e
    if len(reader) == 0:
        raise DataError(f'{path} holds no images (expected members <class>/<image>.jpg|png|...).')
    return ReaderDataset(reader, _classes_of(reader.class_name_to_idx), str(path), **opts)


def _hfds_dataset(ds_name: str, root: str, split: str, class_map, kwargs, labels: bool = True,
                  **opts) -> ReaderDataset:
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise DataError('hfds/ data sets need the datasets package: pip install datasets') from e
    local = Path(ds_name) if Path(ds_name).exists() else (Path(root) / ds_name if root else None)
    if local is not None and local.exists() and (
            (local / 'dataset_dict.json').is_file() or (local / 'state.json').is_file()):
        reader = _SavedHfReader(str(local), split, kwargs.get('input_key', 'image'), kwargs.get('target_key', 'label'),
                                labels=labels)
        classes = reader.classes
    else:
        from timm.data.readers.reader_hfds import ReaderHfds

        target = str(local) if local is not None and local.exists() else ds_name
        try:
            reader = ReaderHfds(target, root=None if local is not None else (root or None), split=split,
                                class_map=class_map, **kwargs)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise DataError(f'cannot load the Hugging Face data set {target} (split "{split}"): {e}') from e
        classes = _classes_of(reader.class_to_idx)
    return ReaderDataset(reader, classes, f'hfds/{ds_name}:{split}', **opts)


def _torch_dataset(name: str, root: str, split: str, download: bool, **opts) -> ReaderDataset:
    from timm.data import create_dataset

    if not root:
        raise DataError(f'--dataset {name} needs --data-dir: the folder torchvision reads (and downloads into with '
                        '--dataset-download).')
    try:
        ds = create_dataset(name, root=root, split=split, download=download)
    except (RuntimeError, FileNotFoundError) as e:
        hint = '' if download else ' Add --dataset-download to let torchvision download it.'
        raise DataError(f'cannot load {name} from {root}: {e}.{hint}') from e
    except AssertionError as e:
        raise DataError(f'--dataset {name}: {e}.') from e
    classes = [str(c) for c in getattr(ds, 'classes', [])]
    return ReaderDataset(_TorchvisionReader(ds), classes, f'{name}:{split}', **opts)


def _indexed_wds_dataset(name: str, root: str, split: str, class_map, kwargs, labels: bool = True,
                         **opts) -> ReaderDataset:
    from .shards import ShardReader

    if not root:
        raise DataError(f'--dataset {name} needs --data-dir: the folder holding the shards and _info.json.')
    unknown = set(kwargs) - {'input_key', 'target_key'}
    if unknown:
        raise DataError(f'--dataset {name}: indexed webdataset shards take only input_key and target_key, not '
                        f'{", ".join(sorted(unknown))}.')
    reader = ShardReader(root, split, class_map=class_map, labels=labels, **kwargs)
    if len(reader) == 0:
        raise DataError(f'the split "{split}" of {root} holds no samples.')
    return ReaderDataset(reader, reader.classes, f'{name}:{root}/{split}', **opts)


class ShardDataset(IterableImageDataset):
    """timm's ``IterableImageDataset`` over webdataset shards (training), with the counters the training loop reads
    (webdataset's pipeline drops an undecodable sample itself, with a log line: nothing to count here)."""
    num_skipped = 0
    classes: List[str] = []

    def reset_skipped(self) -> None:
        pass


def _wds_dataset(name: str, root: str, split: str, class_map, is_training: bool, batch_size: int, seed: int,
                 kwargs) -> Dataset:
    try:
        import webdataset  # noqa: F401
    except ImportError as e:
        raise DataError('wds/ data sets need the webdataset package: pip install webdataset') from e
    if not root or not Path(root).is_dir():
        raise DataError(f'--dataset {name} needs --data-dir: the folder holding the shards and _info.json.')
    from timm.data.readers.reader_wds import _load_info

    from .shards import INFO_FILES, shard_class_map

    info = _load_info(root) if any((Path(root) / n).is_file() for n in INFO_FILES) else {}
    index_map, classes = shard_class_map(class_map, info, root)  # the labels' map, as for indexed shards
    try:  # what timm.data.create_dataset does for wds/, on a class that also has the counters
        ds = ShardDataset(root, reader=name, split=split, class_map=index_map, is_training=is_training,
                          batch_size=batch_size, seed=seed, **kwargs)
    except (FileNotFoundError, AssertionError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(f'cannot read webdataset shards of split "{split}" under {root} ({type(e).__name__}: {e}). '
                        "timm's layout: _info.json with the split's shard names and sizes.") from e
    ds.classes = classes
    if is_training and not ds.classes:
        raise DataError(f'the webdataset shards under {root} name no classes: give --class-map FILE (one class name '
                        'per line) or a "classes" list in _info.json.')
    ds.root = f'{name}:{root}/{split}'
    return ds
