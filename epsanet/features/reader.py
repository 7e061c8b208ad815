"""Reading an ``epsanet extract`` output back, lazily: ``feats = epsanet.features.load(OUTPUT)``.

Nothing is read until asked for: shards are opened memory-mapped (``safetensors.safe_open``,
``numpy.load(mmap_mode='r')``) and only the requested rows are copied out.

    feats = load('feats/')                      # a folder, a .npy or .safetensors output, or its index.json
    len(feats), feats.keys(), feats.paths[:3]
    feats['cats/001.jpg']                       # {'features': tensor [2048]}: the row of one image
    feats.rows(100, 200)                        # {'features': tensor [100, 2048]}
    for paths, batch in feats.batches(4096):    # the whole output in row order, a batch at a time
        ...
"""
import bisect
import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import DataError
from .output import INDEX_FORMAT, read_json

__all__ = ['Features', 'load']


def _index_path(path: Path) -> Path:
    if path.is_dir():
        return path / 'index.json'
    if path.name.endswith('index.json'):
        return path
    if path.suffix in ('.npy', '.safetensors'):
        stem = path.with_suffix('')
        for candidate in (Path(f'{stem}.index.json'), Path(f'{Path(stem).with_suffix("")}.index.json')):
            if candidate.is_file():  # NAME.npy, or NAME.<key>.npy of a several-output run
                return candidate
        return Path(f'{stem}.index.json')
    return path / 'index.json'


def load(path: Union[str, os.PathLike]) -> 'Features':
    """Open the output of ``epsanet extract`` (folder, ``.npy``/``.safetensors`` file, or ``index.json``)."""
    index_path = _index_path(Path(path))
    if not index_path.is_file():
        raise DataError(f'{path} is not a finished "epsanet extract" output: {index_path} does not exist. An '
                        'interrupted extraction is finished by re-running the same command.')
    index = read_json(index_path)
    if index.get('format') != INDEX_FORMAT:
        raise DataError(f'{index_path} is not an "epsanet extract" index.')
    return Features(index_path.parent, index)


class Features:
    """Rows of an extraction output, one per readable image, in the order of :attr:`paths`."""

    def __init__(self, folder: Path, index: Dict[str, Any]):
        self.folder = Path(folder)
        self.index = index
        self.layout = index['layout']
        self.shards: List[Dict[str, Any]] = index.get('shards', [])
        self._starts = [s['rows'][0] for s in self.shards]
        self._paths: Optional[List[str]] = None
        self._rows: Optional[Dict[str, int]] = None
        self._open: Dict[Any, Any] = {}

    def __len__(self) -> int:
        return int(self.index['num_rows'])

    def __repr__(self) -> str:
        shapes = ', '.join(f'{k} {self.shape(k)}' for k in self.keys())
        return f'Features({len(self)} rows of {shapes}; {self.folder})'

    def keys(self) -> List[str]:
        """Output names: ``features`` (pooled pre-logits) or ``stage<i>``."""
        return list(self.index['tensors'])

    def shape(self, key: str) -> Tuple[int, ...]:
        """The shape of one output over all rows: ``(rows, *row_shape)``."""
        return (len(self), *self.index['tensors'][key]['shape'])

    @property
    def skipped(self) -> List[str]:
        """Images that could not be read (they have no row)."""
        return list(self.index.get('skipped', []))

    @property
    def paths(self) -> List[str]:
        """Image paths relative to the data folder, one per row."""
        if self._paths is None:
            text = (self.folder / self.index['paths']).read_text(encoding='utf-8', errors='surrogateescape')
            self._paths = text.splitlines()
            if len(self._paths) != len(self):
                raise DataError(f'{self.index["paths"]} has {len(self._paths)} lines for {len(self)} rows.')
        return self._paths

    def row_of(self, path: str) -> int:
        """The row of an image path (as listed in :attr:`paths`); ``KeyError`` if it has none."""
        if self._rows is None:
            self._rows = {p: i for i, p in enumerate(self.paths)}
        try:
            return self._rows[Path(path).as_posix() if os.sep != '/' else path]
        except KeyError:
            why = ' (it could not be read)' if path in self.index.get('skipped', []) else ''
            raise KeyError(f'{path}: no row for this image{why}') from None

    def __getitem__(self, item: Union[str, int]) -> Dict[str, torch.Tensor]:
        """The row of an image path or of a row number, as ``{output: tensor}``."""
        row = self.row_of(item) if isinstance(item, str) else int(item)
        if not -len(self) <= row < len(self):
            raise IndexError(f'row {item} out of range for {len(self)} rows')
        row %= len(self)
        return {k: v[0] for k, v in self.rows(row, row + 1).items()}

    def rows(self, start: int, end: int, keys: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Rows ``[start, end)`` of each output (all outputs unless ``keys``), copied out of the maps."""
        start, end = max(0, start), min(len(self), end)
        keys = list(keys or self.keys())
        if self.layout == 'npy':
            return {k: torch.from_numpy(np.array(self._npy(k)[start:end])) for k in keys}
        if self.layout == 'safetensors':
            f = self._safe_open(self.index['files'][keys[0]])
            return {k: f.get_slice(k)[start:end] for k in keys}
        out: Dict[str, List[torch.Tensor]] = {k: [] for k in keys}
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.shards) and self.shards[i]['rows'][0] < end:
            lo, hi = self.shards[i]['rows']
            a, b = max(start, lo) - lo, min(end, hi) - lo
            if b > a:
                for k in keys:
                    f = self._safe_open(self.shards[i]['files'][k]['file'])
                    out[k].append(f.get_slice(k)[a:b])
            i += 1
        return {k: torch.cat(v) if v else torch.empty(0, *self.index['tensors'][k]['shape']) for k, v in out.items()}

    def batches(self, batch_size: int = 1024, keys: Optional[Sequence[str]] = None
                ) -> Iterator[Tuple[List[str], Dict[str, torch.Tensor]]]:
        """``(paths, {output: tensor [n, ...]})`` for consecutive rows, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            end = min(start + batch_size, len(self))
            yield self.paths[start:end], self.rows(start, end, keys)

    def verify(self) -> List[str]:
        """Recompute the checksums of a folder output's shards; returns the files that do not match."""
        bad = []
        for shard in self.shards:
            for entry in shard.get('files', {}).values():
                path = self.folder / entry['file']
                if not path.is_file() or path.stat().st_size != entry['bytes'] or _data_sha256(path) != entry['sha256']:
                    bad.append(entry['file'])
        return bad

    def _safe_open(self, name: str):
        if name not in self._open:
            from safetensors import safe_open
            self._open[name] = safe_open(str(self.folder / name), framework='pt')
        return self._open[name]

    def _npy(self, key: str) -> np.ndarray:
        if key not in self._open:
            self._open[key] = np.load(self.folder / self.index['files'][key], mmap_mode='r')
        return self._open[key]


def _data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data (what follows the header), as recorded in the index."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()
