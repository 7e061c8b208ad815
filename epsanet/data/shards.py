"""Random access to webdataset shards: :class:`ShardReader` indexes the tar shards of a split once.

timm streams ``wds/`` shards (``timm.data.readers.reader_wds``): good for training, but a stream has
no sample ``i`` and no per-sample name, so it cannot key prediction or feature rows, resume at a
position or count an image it could not decode. This reader keeps timm's layout (the split's shard
names and sizes come from timm's info-file helpers) and webdataset's sample rule (members grouped by
key, ``key`` = the member path up to the first ``.`` of its base name), and reads each sample's image
straight from its byte range in the shard.

Only uncompressed ``.tar`` shards have byte ranges; compressed shards are refused with a message.
Each shard's index is kept in the cache folder (:func:`epsanet.cache.cache_dir`, ``EPSANET_CACHE_DIR=none``
turns it off), keyed by the file's path, size and modification time, so later runs and other processes
read it instead of scanning the shard.
A shard holding a different number of samples than the info file says is indexed as it is, with a
warning (the info file is only a size hint; no sample is lost or invented).
"""
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

import numpy as np

from ..cache import cache_dir
from ..files import atomic_write
from .folder import DataError

__all__ = ['ShardReader', 'INFO_FILES', 'shard_class_map']

_logger = logging.getLogger(__name__)

INFO_FILES = ('_info.json', 'info.json')  # what timm's ReaderWds reads (timm.data.readers.reader_wds._load_info)
_SKIP_META = re.compile(r'__[^/]*__($|/)')  # webdataset's tar_file_iterator skips these members
_COMPRESSED = {b'\x1f\x8b': 'gzip', b'BZh': 'bzip2', b'\xfd7zXZ': 'xz', b'\x28\xb5\x2f\xfd': 'zstd'}
_MAX_OPEN = 8  # shard files kept open per process
INDEX_VERSION = 1  # of the cached shard indexes


class ShardReader:
    """The samples of one split of webdataset shards, by index (a timm-style reader).

    ``reader[i]`` is ``(file object of the image bytes, target)``; :meth:`filename` is
    ``<shard>/<key>.<ext>``; :attr:`classes` come from ``class_map`` or the info file's ``classes``.

    Args:
        root: the folder holding the shards and timm's ``_info.json``.
        split: a split of the info file, or timm's brace form (``val-{0000..0003}.tar``).
        class_map: timm's class map (file or dict); targets are remapped as timm's ``remap_target`` does.
        input_key: image extensions to look for, first present wins (timm's ``input_key``).
        target_key: a field of the ``json`` sidecar holding the class index (default: the ``cls`` member,
            or the split's ``alt_label`` field).
        labels: False (prediction, feature extraction): labels are not read; every sample with an image is
            taken, with target 0, so unlabelled shards work too.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str, class_map: Union[str, dict, None] = None,
                 input_key: str = 'jpg;png;webp', target_key: Optional[str] = None, labels: bool = True):
        try:
            import webdataset  # noqa: F401  (timm's info-file helpers and the key rule come from it)
        except ImportError as e:
            raise DataError('wds/ data sets need the webdataset package: pip install webdataset') from e
        from timm.data.readers.reader_wds import _load_info, _parse_split_info

        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f'{self.root} is not a folder: --data-dir must be the folder holding the webdataset shards '
                            f'and {INFO_FILES[0]}.')
        has_info = any((self.root / n).is_file() for n in INFO_FILES)
        if not has_info and not ('tar' in split or '..' in split):  # timm's brace form needs no info file
            raise DataError(f'no {" or ".join(INFO_FILES)} in {self.root}: timm\'s webdataset layout needs an info '
                            'file listing each split\'s shard names and sizes ({"splits": {"val": {"name": "val", '
                            '"num_samples": N, "filenames": [...], "shard_lengths": [...]}}}), or give the shards '
                            'as --split "val-{0000..0009}.tar".')
        self.info: Dict[str, Any] = _load_info(str(self.root)) if has_info else {}
        try:
            self.split_info = _parse_split_info(split, self.info)
        except (RuntimeError, KeyError, ValueError) as e:
            raise DataError(f'the info file in {self.root} has no usable split "{split}" ({type(e).__name__}: {e}); '
                            f'its splits: {", ".join(self.info.get("splits", {})) or "none"}.') from e
        if ',' in (target_key or ''):
            raise DataError(f'target_key "{target_key}": multi-field targets are not supported for random access to '
                            'webdataset shards; give one json field holding the class index.')
        self.labels = labels
        self.input_exts = [e.strip().lower() for e in input_key.split(';') if e.strip()]
        self.json_key = target_key or self.split_info.alt_label or None
        self.shards = list(self.split_info.filenames)
        self.index_map, self.classes = shard_class_map(class_map, self.info, self.root)
        self._index()
        self._pid, self._files = None, OrderedDict()

    # ---- indexing ----------------------------------------------------------------------------------------------
    def _index(self) -> None:
        shard_ids, names, offsets, sizes, targets = [], [], [], [], []
        lengths = list(self.split_info.shard_lengths) or [None] * len(self.shards)
        unlabelled = 0
        for s, (shard, expected) in enumerate(zip(self.shards, lengths)):
            samples, skipped = self._cached_index_shard(shard)
            unlabelled += skipped
            if expected is not None and len(samples) + skipped != expected:
                _logger.warning('shard %s holds %d samples, the info file in %s says %d: using the %d found.',
                                shard, len(samples) + skipped, self.root, expected, len(samples))
            for name, offset, size, target in samples:
                shard_ids.append(s)
                names.append(name)
                offsets.append(offset)
                sizes.append(size)
                targets.append(target)
        if unlabelled:
            _logger.warning('%d samples of split "%s" in %s have a negative (missing) label and are left out, as '
                            "timm's webdataset reader does.", unlabelled, self.split_info.name, self.root)
        self._shard_of = np.asarray(shard_ids, dtype=np.int32)
        self._names = names
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._targets = np.asarray(targets, dtype=np.int64)

    def _cached_index_shard(self, shard: str) -> Tuple[List[Tuple[str, int, int, int]], int]:
        """:meth:`_index_shard`, kept in the cache folder (:func:`epsanet.cache.cache_dir`) per shard file,
        keyed by its path, size and modification time and by the reader's options: a later run, or another
        process, reads the index instead of scanning the shard again."""
        folder = cache_dir()
        path = (self.root / shard).resolve()
        if folder is None or not path.is_file():
            return self._index_shard(shard)
        stat = path.stat()
        key = json.dumps([INDEX_VERSION, shard, str(path), stat.st_size, stat.st_mtime_ns, self.input_exts,
                          self.json_key, self.labels, sorted((self.index_map or {}).items())])
        cached = folder / 'wds-index' / f'{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz'
        try:
            with np.load(cached, allow_pickle=False) as data:
                samples = list(zip(data['names'].tolist(), data['offsets'].tolist(), data['sizes'].tolist(),
                                   data['targets'].tolist()))
                return samples, int(data['skipped'])
        except (OSError, KeyError, ValueError):
            pass  # not cached yet (or unreadable): index the shard
        samples, skipped = self._index_shard(shard)
        names, offsets, sizes, targets = zip(*samples) if samples else ((), (), (), ())
        arrays = dict(names=np.asarray(names, dtype=str), offsets=np.asarray(offsets, dtype=np.int64),
                      sizes=np.asarray(sizes, dtype=np.int64), targets=np.asarray(targets, dtype=np.int64),
                      skipped=np.asarray(skipped))
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, lambda tmp: _save_npz(tmp, arrays))
        except OSError as e:  # a read-only cache folder costs speed, not correctness
            _logger.debug('cannot keep the index of %s in %s: %s', path, cached, e)
        return samples, skipped

    def _index_shard(self, shard: str) -> Tuple[List[Tuple[str, int, int, int]], int]:
        """``(name, data offset, size, target)`` of each labelled sample of one shard, and how many had no label."""
        from webdataset.tariterators import base_plus_ext  # webdataset's own key / extension split

        path = self.root / shard
        if not path.is_file():
            raise DataError(f'shard {shard} listed for split "{self.split_info.name}" is missing from {self.root}; '
                            'restore it, or remove it from the info file.')
        with open(path, 'rb') as f:
            head = f.read(6)
        kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
        if kind:
            raise DataError(f'shard {path} is {kind}-compressed: random access (validate, predict, extract) needs '
                            'uncompressed .tar shards; decompress it (the file size grows only a little for images).')
        samples, skipped = [], 0
        try:
            with tarfile.open(path, 'r:') as tar:
                key, members = None, {}
                for member in tar:
                    if not member.isreg() or _SKIP_META.match(member.name):
                        continue
                    base, ext = base_plus_ext(member.name)
                    if base is None:
                        continue
                    if base != key:
                        if key is not None:
                            skipped += self._add_sample(tar, shard, key, members, samples)
                        key, members = base, {}
                    ext = ext.lower()
                    if ext in members:
                        raise DataError(f'shard {path}: sample "{key}" has two "{ext}" members; webdataset keys '
                                        'must be unique within a shard (members of a sample are consecutive).')
                    members[ext] = member
                if key is not None:
                    skipped += self._add_sample(tar, shard, key, members, samples)
        except tarfile.TarError as e:
            raise DataError(f'cannot read shard {path} as a tar file ({type(e).__name__}: {e}).') from e
        return samples, skipped

    def _add_sample(self, tar: tarfile.TarFile, shard: str, key: str, members: Dict[str, tarfile.TarInfo],
                    out: List[Tuple[str, int, int, int]]) -> int:
        ext = next((e for e in self.input_exts if e in members), None)
        if ext is None:
            raise DataError(f'sample "{key}" of shard {self.root / shard} has no image member (it has: '
                            f'{", ".join(sorted(members))}; looked for {", ".join(self.input_exts)}). '
                            'Add the image, or name its extension in input_key (create_image_dataset(..., '
                            'input_key="jpeg;jpg;png")).')
        target = self._target(tar, shard, key, members) if self.labels else 0
        if target is None:
            return 1
        image = members[ext]
        out.append((f'{shard}/{key}.{ext}', image.offset_data, image.size, target))
        return 0

    def _target(self, tar: tarfile.TarFile, shard: str, key: str, members: Dict[str, tarfile.TarInfo]) -> Optional[int]:
        where = f'sample "{key}" of shard {self.root / shard}'
        member = members.get('json' if self.json_key else 'cls')
        if member is None:
            need = f'a json sidecar with the field "{self.json_key}"' if self.json_key else 'a .cls member'
            raise DataError(f'{where} has no label: every sample needs {need} (it has: {", ".join(sorted(members))}).')
        raw = tar.extractfile(member).read()
        try:
            if self.json_key:
                from timm.data.readers.targets import get_field, has_field

                meta = json.loads(raw)
                label = get_field(meta, self.json_key) if has_field(meta, self.json_key) else None
            else:
                label = raw.decode().strip()
            target = None if label is None else int(label)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f'{where}: its label is not a class index ({type(e).__name__}: {e}).') from e
        if target is None:
            raise DataError(f'{where}: its json sidecar has no field "{self.json_key}" (fields: '
                            f'{", ".join(sorted(meta))}); give the field holding the class index as target_key.')
        if target < 0:
            return None
        return self._remap(target, where)

    def _remap(self, target: int, where: str) -> int:
        if self.index_map is None:
            return target
        if target not in self.index_map:
            raise DataError(f'{where}: its class {target} is not in the class map; add it to the map.')
        return self.index_map[target]

    # ---- the reader interface -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """``<shard>/<key>.<ext>``: unique within the split, the same in every run."""
        name = self._names[index]
        return str(self.root / name) if absolute else name

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i, basename, absolute) for i in range(len(self))]

    def __getitem__(self, index: int) -> Tuple[BinaryIO, int]:
        f = self._open(int(self._shard_of[index]))
        f.seek(int(self._offsets[index]))
        data = f.read(int(self._sizes[index]))
        return io.BytesIO(data), int(self._targets[index])

    def _open(self, shard: int) -> BinaryIO:
        """The shard's file, opened once per process (DataLoader workers and torchrun ranks each open their own)."""
        if self._pid != os.getpid():
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= _MAX_OPEN:
                self._files.popitem(last=False)[1].close()
            f = self._files[shard] = open(self.root / self.shards[shard], 'rb')
        else:
            self._files.move_to_end(shard)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = OrderedDict()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state['_files'], state['_pid'] = OrderedDict(), None
        return state


def _save_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    with open(path, 'wb') as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **arrays)


def shard_class_map(class_map: Union[str, dict, None], info: Dict[str, Any], root: Union[str, os.PathLike]
                    ) -> Tuple[Optional[Dict[int, int]], List[str]]:
    """timm's class map for webdataset labels (class indices) as ``(label -> class index, class names)``.

    A map keyed by label is used as it is; a map of names re-indexes the info file's ``classes`` (as
    timm's ``remap_target`` does with source names), each of which must be in it; without ``classes``
    in the info file a map of names only names the labels (mapping ``None``: labels kept). Without a
    map: no mapping, the names are the info file's ``classes`` (or none).
    """
    source = [str(c) for c in info.get('classes') or []]
    if not class_map:
        return None, source
    from timm.data.readers.class_map import load_class_map
    try:
        mapping = load_class_map(class_map, root=str(root))
    except (AssertionError, OSError, ValueError) as e:
        raise DataError(f'cannot read the class map {class_map}: {e}. A class map is a text file with one class name '
                        'per line (line i = class index i).') from e
    names = _class_names(mapping)
    if all(isinstance(k, int) for k in mapping):
        return {int(k): int(v) for k, v in mapping.items()}, names
    if not source:
        return None, names
    missing = [c for c in source if c not in mapping]
    if missing:
        raise DataError(f'the classes {", ".join(missing[:10])} of the info file in {root} are not in the class map '
                        f'{class_map}; add them to the map.')
    return {i: int(mapping[c]) for i, c in enumerate(source)}, names


def _class_names(class_to_idx: Dict[Any, int]) -> List[str]:
    names = [''] * (max(class_to_idx.values()) + 1)
    for name, i in class_to_idx.items():
        names[i] = str(name)
    return names
