"""ShardReader's per-shard index cache: written once, read back instead of scanning, redone when a shard changes."""
import os

import pytest

from epsanet.data.shards import ShardReader
from epsanet.data.synthetic import write_wds


@pytest.fixture()
def shards(folder, tmp_path, monkeypatch):
    monkeypatch.setenv('EPSANET_CACHE_DIR', str(tmp_path / 'cache'))
    return write_wds(folder / 'val', tmp_path / 'wds', 'val', shards=2), tmp_path / 'cache' / 'wds-index'


def _content(reader):
    return [(reader.filename(i), reader[i][1], reader[i][0].read()) for i in range(len(reader))]


def test_second_reader_reads_the_cached_index(shards, monkeypatch):
    root, cache = shards
    first = ShardReader(root, 'val')
    assert len(list(cache.glob('*.npz'))) == 2  # one per shard

    def no_scan(self, shard):
        raise AssertionError(f'{shard} scanned again')
    monkeypatch.setattr(ShardReader, '_index_shard', no_scan)
    second = ShardReader(root, 'val')
    assert _content(second) == _content(first) and len(second) == 9


def test_a_changed_shard_is_indexed_again(shards, folder, monkeypatch):
    root, cache = shards
    ShardReader(root, 'val')
    write_wds(folder / 'train', root, 'val', shards=2)  # the same shard names, other samples
    for i, p in enumerate(sorted(root.glob('*.tar'))):
        os.utime(p, ns=(10 ** 18 + i, 10 ** 18 + i))  # a modification time no earlier run can have
    scanned = []
    original = ShardReader._index_shard
    monkeypatch.setattr(ShardReader, '_index_shard', lambda self, shard: scanned.append(shard) or original(self, shard))
    reader = ShardReader(root, 'val')
    assert len(scanned) == 2 and len(reader) == 6  # the train split: 2 images per class


def test_cache_off(shards, monkeypatch):
    root, cache = shards
    monkeypatch.setenv('EPSANET_CACHE_DIR', 'none')
    assert len(ShardReader(root, 'val')) == 9 and not cache.exists()
