"""The output of ``epsanet extract`` on disk: its layout, the run plan (for resuming) and ``index.json``.

Three layouts, chosen by ``--output``:

* a folder (the default, for any size): ``<key>-<chunk>.safetensors`` shards, ``index.json``,
  ``paths.txt``; work in progress is recorded in ``.progress/``;
* ``NAME.npy``: ``NAME.npy`` (one output) or ``NAME.<key>.npy``, plus ``NAME.index.json`` and
  ``NAME.paths.txt``; the arrays are filled in place in ``NAME.parts/`` and moved out when done;
* ``NAME.safetensors``: one file with one tensor per output, plus the same two side files; it
  is assembled from shards written to ``NAME.parts/``.

The plan (``plan.json`` in the work folder) records what is being extracted (images, model,
weights, preprocessing, outputs) and the chunk size. Each finished chunk leaves a record
``chunk-<n>.json``; a re-run with the same plan skips those chunks. ``index.json`` is written
last, so an output with an index is complete.
"""
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..app.errors import ConfigError
from ..app.outputs import check_new, check_not_input
from ..files import atomic_write
from .writers import TensorSpec, compact_npy, concat_safetensors, preallocate_npy

__all__ = ['Layout', 'INDEX_FORMAT', 'fingerprint', 'write_json', 'read_json']

_logger = logging.getLogger(__name__)

INDEX_FORMAT = 'epsanet-features'
INDEX_VERSION = 1


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint(names: Sequence[str]) -> str:
    """sha256 of the image list (row keys in order)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode('utf-8', 'surrogateescape') + b'\n')
    return h.hexdigest()


class Layout:
    """Paths of one output (see the module docstring)."""

    def __init__(self, output: str, keys: Sequence[str]):
        out = Path(output)
        self.keys = list(keys)
        if out.suffix in ('.npy', '.safetensors'):
            self.kind = out.suffix[1:]
            stem = out.with_suffix('')
            self.index = Path(f'{stem}.index.json')
            self.paths = Path(f'{stem}.paths.txt')
            self.work = Path(f'{stem}.parts')
            self.shard_dir = self.work
            if self.kind == 'npy':
                self.files = {k: out if len(keys) == 1 else Path(f'{stem}.{k}.npy') for k in keys}
            else:
                self.files = {k: out for k in keys}
        elif out.suffix in ('.json', '.txt', '.csv', '.tsv', '.pt', '.pth', '.pkl', '.parquet', '.h5', '.npz'):
            raise ConfigError(f'--output {output}: give a folder (sharded safetensors), a .npy or a .safetensors '
                              'file name.')
        else:
            self.kind = 'folder'
            self.index = out / 'index.json'
            self.paths = out / 'paths.txt'
            self.work = out / '.progress'
            self.shard_dir = out
            self.files = {}
        self.output = out

    @property
    def plan_file(self) -> Path:
        return self.work / 'plan.json'

    def record_file(self, chunk: int) -> Path:
        return self.work / f'chunk-{chunk:05d}.json'

    def npy_part(self, key: str) -> Path:
        return self.work / f'{key}.npy'

    def shard_file(self, key: str, chunk: int) -> Path:
        return self.shard_dir / f'{key}-{chunk:05d}.safetensors'

    # --- starting or resuming ---------------------------------------------------------------------------------------

    def check_policy(self, inputs: Sequence[str], overwrite: bool) -> None:
        """The output policy (:mod:`epsanet.app.outputs`): no output file or folder is, or holds, an input; the
        final files may only exist as part of an extraction output already here (finished: its index; or
        in progress: its plan), else ``overwrite`` is needed."""
        finals = [*self.files.values(), self.index, self.paths]
        check_not_input([self.output, *finals], inputs)
        if self.finished_plan() is None and not self.plan_file.is_file():
            check_new(finals, overwrite)

    def finished_plan(self) -> Optional[Dict[str, Any]]:
        """The plan of a complete output at this place, or None."""
        if not self.index.is_file():
            return None
        try:
            return read_json(self.index).get('plan')
        except (OSError, ValueError):
            return None

    def prepare(self, plan: Dict[str, Any], specs: Sequence[TensorSpec], overwrite: bool) -> Dict[str, Any]:
        """Start the work folder, or find the one a previous run left; returns the plan in force.

        A previous plan wins over ``plan``'s chunk size (so a resumed run cuts the work the same way,
        whatever its number of processes); any other difference is an error unless ``overwrite``.
        """
        if self.kind == 'folder' and self.output.exists() and not self.output.is_dir():
            raise ConfigError(f'--output {self.output} is a file; a folder output needs a folder name (or use .npy).')
        if self.index.exists():
            if self.finished_plan() is None and not overwrite:
                raise ConfigError(f'{self.index} exists and is not the index of an "epsanet extract" output; choose '
                                  'another --output, or pass --overwrite to replace it.')
            self.remove_finished()  # a finished output with another plan (checked by the caller), --overwrite given
        if self.plan_file.is_file():
            old = read_json(self.plan_file)
            diff = differences(old, plan)
            if not diff:
                return old
            if not overwrite:
                raise ConfigError(
                    f'{self.work} holds an unfinished extraction with other settings ({", ".join(diff)} differ). '
                    'Re-run the same command to finish it, or pass --overwrite to start again, or choose another '
                    '--output.')
            _logger.warning('--overwrite: discarding the unfinished extraction in %s.', self.work)
        if self.work.exists():
            self.remove_work()
        if self.kind == 'folder' and self.output.is_dir() and any(self.output.glob('*.safetensors')):
            if not overwrite:
                raise ConfigError(f'{self.output} already holds .safetensors files that are not an extraction in '
                                  'progress; choose an empty or new folder, or pass --overwrite.')
            for path in self.output.glob('*-[0-9][0-9][0-9][0-9][0-9].safetensors'):
                path.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        if self.kind == 'npy':
            for spec in specs:
                preallocate_npy(self.npy_part(spec.name), spec, plan['images'])
        write_json(self.plan_file, plan)
        return plan

    def remove_finished(self) -> None:
        """Remove a complete output's files (for --overwrite)."""
        try:
            index = read_json(self.index)
        except (OSError, ValueError):
            index = {}
        for shard in index.get('shards', []):
            for entry in shard.get('files', {}).values():
                (self.shard_dir / entry['file']).unlink(missing_ok=True)
        for path in list(self.files.values()) + [self.paths, self.index]:
            path.unlink(missing_ok=True)

    def remove_work(self) -> None:
        if self.kind == 'folder':
            for path in self.output.glob('.*-[0-9][0-9][0-9][0-9][0-9].safetensors.tmp'):
                path.unlink()
        shutil.rmtree(self.work, ignore_errors=True)

    def completed(self, chunk: int) -> Optional[Dict[str, Any]]:
        """The record of a finished chunk whose files are all there with their recorded sizes, or None."""
        path = self.record_file(chunk)
        if not path.is_file():
            return None
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return None
        for entry in record.get('files', {}).values():
            file = self.shard_dir / entry['file']
            if not file.is_file() or file.stat().st_size != entry['bytes']:
                _logger.warning('%s is missing or has the wrong size: its chunk is extracted again.', file)
                return None
        return record

    # --- finishing --------------------------------------------------------------------------------------------------

    def finish(self, plan: Dict[str, Any], specs: Sequence[TensorSpec], names: Sequence[str],
               records: List[Dict[str, Any]], info: Dict[str, Any]) -> Dict[str, Any]:
        """Merge the chunk records (in image order) into the final files and ``index.json``; returns the index."""
        rows = 0
        shards, skipped, keep = [], [], []
        for record in records:
            start, end = record['images']
            bad = set(record['skipped'])
            skipped.extend(names[start + i] for i in sorted(bad))
            keep.extend(start + i for i in range(end - start) if i not in bad)
            shard = dict(chunk=record['chunk'], images=[start, end], rows=[rows, rows + record['count']],
                         count=record['count'])
            if 'files' in record:
                shard['files'] = record['files']
            if 'sha256' in record:
                shard['sha256'] = record['sha256']
            shards.append(shard)
            rows += record['count']
        index: Dict[str, Any] = dict(
            format=INDEX_FORMAT, version=INDEX_VERSION, layout=self.kind, num_rows=rows, num_images=len(names),
            tensors={s.name: s.as_dict() for s in specs}, paths=self.paths.name, skipped=skipped, **info, plan=plan)
        def write_paths(tmp: str) -> None:
            with open(tmp, 'w', encoding='utf-8', errors='surrogateescape') as f:
                f.writelines(names[i] + '\n' for i in keep)
        atomic_write(self.paths, write_paths)
        if self.kind == 'folder':
            index['shards'] = shards
        elif self.kind == 'npy':
            ranges = _ranges(keep)
            for spec in specs:
                part = self.npy_part(spec.name)
                compact_npy(part, ranges)
                part.replace(self.files[spec.name])
            index['files'] = {k: p.name for k, p in self.files.items()}
            index['shards'] = shards
        else:
            parts = {s.name: [self.shard_dir / r['files'][s.name]['file'] for r in records] for s in specs}
            counts = {s.name: [r['count'] for r in records] for s in specs}
            concat_safetensors(self.files[self.keys[0]], parts, specs, counts,
                               metadata={'format': INDEX_FORMAT, 'paths': self.paths.name})
            index['files'] = {k: p.name for k, p in self.files.items()}
            index['shards'] = [{k: v for k, v in s.items() if k != 'files'} for s in shards]
        write_json(self.index, index)
        shutil.rmtree(self.work, ignore_errors=True)
        return index


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Names of the plan entries that differ (the chunk size is the old run's to choose)."""
    keys = (set(old) | set(new)) - {'chunk_images'}
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _ranges(indices: Sequence[int]) -> List[List[int]]:
    """Sorted indices as ``[start, end)`` runs."""
    out: List[List[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return out
