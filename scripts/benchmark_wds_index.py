#!/usr/bin/env python3
"""How long indexing webdataset shards takes (``epsanet.data.shards.ShardReader``), and random reads after it.

Writes ``--shards`` uncompressed shards of ``--per-shard`` samples each (``<key>.jpg`` of ``--image-bytes``
random bytes + ``<key>.cls``, timm's ``_info.json``) into a temporary folder, then times building the reader
(one pass over the tar headers and the labels), building it again from the cached index (a cache folder in
the same temporary folder), and reading ``--reads`` random samples' bytes.

    python scripts/benchmark_wds_index.py                        # 8 shards x 2500 samples of 20 KB
    python scripts/benchmark_wds_index.py --shards 4 --per-shard 10000
"""
import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import webdataset as wds

from epsanet.data.shards import ShardReader


def write_shards(root: Path, shards: int, per_shard: int, image_bytes: int) -> None:
    rng = random.Random(0)
    names = []
    for s in range(shards):
        names.append(f'val-{s:04d}.tar')
        with wds.TarWriter(str(root / names[-1])) as sink:
            for i in range(per_shard):
                sink.write({'__key__': f'img{s:04d}_{i:06d}', 'jpg': rng.randbytes(image_bytes),
                            'cls': str(i % 1000).encode()})
    info = dict(splits=dict(val=dict(name='val', num_samples=shards * per_shard, filenames=names,
                                     shard_lengths=[per_shard] * shards)))
    (root / '_info.json').write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shards', type=int, default=8)
    parser.add_argument('--per-shard', type=int, default=2500)
    parser.add_argument('--image-bytes', type=int, default=20000)
    parser.add_argument('--reads', type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'shards'
        root.mkdir()
        os.environ['EPSANET_CACHE_DIR'] = str(Path(tmp) / 'cache')
        write_shards(root, args.shards, args.per_shard, args.image_bytes)
        size = sum(p.stat().st_size for p in root.glob('*.tar'))
        start = time.perf_counter()
        reader = ShardReader(root, 'val')
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        ShardReader(root, 'val')
        cached_s = time.perf_counter() - start
        order = random.Random(1).sample(range(len(reader)), min(args.reads, len(reader)))
        start = time.perf_counter()
        for i in order:
            reader[i][0].read()
        read_s = time.perf_counter() - start
        print(f'{len(reader)} samples in {args.shards} shards ({size / 2 ** 20:.0f} MiB): indexed in {index_s:.2f}s '
              f'({len(reader) / index_s:.0f} samples/s), from the cached index in {cached_s:.2f}s; '
              f'{len(order)} random reads in {read_s:.2f}s '
              f'({len(order) / read_s:.0f}/s, page cache warm)')


if __name__ == '__main__':
    main()
