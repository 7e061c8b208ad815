"""Where extracted rows go: streamed safetensors shards, or a preallocated ``.npy`` memory map.

Work is cut into *chunks* of consecutive images. A chunk is written by one process through a
*chunk writer* (``add`` rows, ``close`` returns a record) and is complete once its record exists;
everything else about a chunk can be thrown away and redone. Neither writer keeps more than a
batch of rows in memory.

* :class:`ShardWriter`: one safetensors file per chunk and output (``<key>-<chunk>.safetensors``),
  streamed to disk: the header space is reserved up front and filled in with the real row count
  when the chunk ends; the file gets its name only when complete.
* :class:`NpyWriter`: one ``.npy`` per output, preallocated with a row per image; each batch
  maps only its own rows (so memory stays flat) and writes them in place. Rows of unreadable images
  are dropped at the end by :func:`compact_npy`, which moves the later rows up and rewrites the
  header.
"""
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

__all__ = ['TensorSpec', 'SafetensorsStream', 'ShardWriter', 'NpyWriter', 'preallocate_npy', 'compact_npy',
           'concat_safetensors', 'SAFETENSORS_DTYPES']

SAFETENSORS_DTYPES = {'float32': 'F32', 'float16': 'F16'}
_COPY_BYTES = 64 << 20  # block size when moving data inside or between files


class TensorSpec:
    """Name, per-row shape and dtype of one output."""

    def __init__(self, name: str, shape: Sequence[int], dtype: str = 'float32'):
        self.name, self.shape, self.dtype = name, tuple(int(s) for s in shape), dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def as_dict(self) -> Dict[str, Any]:
        return dict(shape=list(self.shape), dtype=self.dtype)


def _fsync_replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class SafetensorsStream:
    """A one-tensor safetensors file written row block by row block, named ``path`` when closed.

    The header is written last, into space reserved for ``max_rows`` rows (JSON padded with
    spaces, which the format allows), so the rows never have to be held in memory.
    """

    def __init__(self, path: Path, spec: TensorSpec, max_rows: int):
        self.path, self.spec = Path(path), spec
        self.tmp = self.path.with_name(f'.{self.path.name}.tmp')
        self.header_len = len(self._header(max_rows))
        self.header_len += -(8 + self.header_len) % 8  # data starts 8-byte aligned
        self.rows = 0
        self.sha256 = hashlib.sha256()
        self.file = open(self.tmp, 'wb')
        self.file.write(b'\0' * (8 + self.header_len))

    def _header(self, rows: int) -> bytes:
        entry = dict(dtype=SAFETENSORS_DTYPES[self.spec.dtype], shape=[rows, *self.spec.shape],
                     data_offsets=[0, rows * self.spec.row_bytes])
        return json.dumps({self.spec.name: entry}, separators=(',', ':')).encode()

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.spec.dtype)
        if rows.shape[1:] != self.spec.shape:
            raise ValueError(f'{self.spec.name}: rows of shape {rows.shape[1:]}, expected {self.spec.shape}')
        if not len(rows):
            return
        data = memoryview(rows).cast('B')
        self.file.write(data)
        self.sha256.update(data)
        self.rows += len(rows)

    def close(self) -> Dict[str, Any]:
        """Finish the file (header, fsync, rename); return its name, size and the sha256 of its data."""
        header = self._header(self.rows).ljust(self.header_len, b' ')
        self.file.seek(0)
        self.file.write(struct.pack('<Q', len(header)) + header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        _fsync_replace(self.tmp, self.path)
        return dict(file=self.path.name, bytes=8 + len(header) + self.rows * self.spec.row_bytes,
                    sha256=self.sha256.hexdigest())

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """The rows of one chunk as one streamed safetensors file per output."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], chunk: int, num_images: int):
        self.streams = {s.name: SafetensorsStream(Path(folder) / f'{s.name}-{chunk:05d}.safetensors', s, num_images)
                        for s in specs}

    def add(self, rows: Dict[str, np.ndarray], positions: np.ndarray) -> None:
        """``rows[key]`` holds the readable images' rows; ``positions`` their offsets in the chunk (unused here)."""
        for key, stream in self.streams.items():
            stream.write(rows[key])

    def close(self) -> Dict[str, Any]:
        return dict(files={key: stream.close() for key, stream in self.streams.items()})

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.abort()


# --- .npy ---------------------------------------------------------------------------------------------------------

def preallocate_npy(path: Path, spec: TensorSpec, rows: int) -> None:
    """An ``.npy`` file of ``rows`` zero rows (sparse on most file systems) to be filled by :class:`NpyWriter`."""
    array = np.lib.format.open_memmap(path, mode='w+', dtype=spec.dtype, shape=(rows, *spec.shape))
    del array


def _npy_header(path: Path) -> Tuple[int, Tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of an ``.npy`` file."""
    with open(path, 'rb') as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f'{path}: Fortran-ordered arrays are not supported')
        return f.tell(), shape, dtype


class NpyWriter:
    """Writes one chunk's rows in place into the preallocated ``.npy`` files (one per output).

    Each batch maps only its own rows and drops the map straight away, so resident memory does
    not grow with the chunk or the output; ``close`` makes the chunk durable (fsync).
    """

    def __init__(self, files: Dict[str, Path], specs: Sequence[TensorSpec], start: int, num_images: int):
        self.files, self.specs, self.start = files, list(specs), start
        self.offsets = {spec.name: _npy_header(files[spec.name])[0] for spec in specs}
        self.sha256 = {spec.name: hashlib.sha256() for spec in specs}

    def add(self, rows: Dict[str, np.ndarray], positions: np.ndarray) -> None:
        """Write ``rows[key][i]`` to row ``start + positions[i]`` (positions ascending)."""
        if not len(positions):
            return
        first, last = int(positions[0]), int(positions[-1])
        for spec in self.specs:
            window = np.memmap(self.files[spec.name], dtype=spec.dtype, mode='r+',
                               offset=self.offsets[spec.name] + (self.start + first) * spec.row_bytes,
                               shape=(last - first + 1, *spec.shape))
            window[positions - first] = rows[spec.name]
            del window  # unmapped: the written pages leave this process (the page cache writes them back)
            self.sha256[spec.name].update(np.ascontiguousarray(rows[spec.name], dtype=spec.dtype).data)

    def close(self) -> Dict[str, Any]:
        for path in set(self.files.values()):
            fd = os.open(path, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return dict(sha256={k: v.hexdigest() for k, v in self.sha256.items()})

    def abort(self) -> None:
        pass


def compact_npy(path: Path, keep: Sequence[Tuple[int, int]]) -> int:
    """Keep only the row ranges ``keep`` (sorted ``[start, end)`` pairs) of an ``.npy`` file, in place.

    Later rows move up block by block (bounded memory), the header gets the new row count (padded
    to its old length, as the format allows) and the file is truncated. Returns the new row count.
    """
    offset, shape, dtype = _npy_header(path)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    rows = 0
    with open(path, 'r+b') as f:
        for start, end in keep:
            if start != rows:
                _move(f, offset + start * row_bytes, offset + rows * row_bytes, (end - start) * row_bytes)
            rows += end - start
        header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': (rows, *shape[1:])}
        text = repr(header).encode('latin1')
        f.seek(0)
        prefix = f.read(offset)
        old_len = offset - (10 if prefix[6] == 1 else 12)
        if len(text) + 1 > old_len:
            raise ValueError(f'{path}: new header does not fit')  # cannot happen: fewer rows, fewer digits
        f.seek(offset - old_len)
        f.write(text.ljust(old_len - 1, b' ') + b'\n')
        f.truncate(offset + rows * row_bytes)
        f.flush()
        os.fsync(f.fileno())
    return rows


def _move(f, src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from ``src`` to ``dst < src`` inside the open file ``f``."""
    done = 0
    while done < size:
        n = min(_COPY_BYTES, size - done)
        f.seek(src + done)
        block = f.read(n)
        f.seek(dst + done)
        f.write(block)
        done += n


# --- one .safetensors file from shards -------------------------------------------------------------------------------

def concat_safetensors(path: Path, parts: Dict[str, List[Path]], specs: Sequence[TensorSpec],
                       rows: Dict[str, List[int]], metadata: Dict[str, str]) -> None:
    """Write ``path``: one tensor per output, its rows the concatenation of that output's shard files.

    The data is copied file to file in blocks, never held in memory. ``rows[key]`` gives each
    shard's row count.
    """
    header: Dict[str, Any] = {'__metadata__': metadata}
    offset = 0
    for spec in specs:
        total = sum(rows[spec.name])
        header[spec.name] = dict(dtype=SAFETENSORS_DTYPES[spec.dtype], shape=[total, *spec.shape],
                                 data_offsets=[offset, offset + total * spec.row_bytes])
        offset += total * spec.row_bytes
    text = json.dumps(header, separators=(',', ':')).encode()
    text = text.ljust(len(text) + (-(8 + len(text)) % 8), b' ')
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        with open(tmp, 'wb') as out:
            out.write(struct.pack('<Q', len(text)) + text)
            for spec in specs:
                for part, count in zip(parts[spec.name], rows[spec.name]):
                    with open(part, 'rb') as f:
                        (n,) = struct.unpack('<Q', f.read(8))
                        f.seek(8 + n)
                        _copy(f, out, count * spec.row_bytes)
            out.flush()
            os.fsync(out.fileno())
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy(src, dst, size: int) -> None:
    while size > 0:
        block = src.read(min(_COPY_BYTES, size))
        if not block:
            raise OSError(f'{src.name} is shorter than its header says')
        dst.write(block)
        size -= len(block)
