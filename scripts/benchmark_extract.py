#!/usr/bin/env python3
"""Throughput and peak memory of ``epsanet extract`` for growing numbers of images.

For each count, writes that many random PNGs into a temporary folder, runs ``epsanet extract``
on them in a fresh process and prints img/s (the extraction loop, from its log line) and the
process's peak RSS (``getrusage``, the extraction process itself with ``-j 0``; with workers,
theirs is printed apart). Memory should be flat: the features stream to disk.

    python scripts/benchmark_extract.py                          # 1000 and 4000 images, --stages 1 at 64 px
    python scripts/benchmark_extract.py --counts 500 2000 -- --output-kind npy
    python scripts/benchmark_extract.py -- --pool-stages         # anything after -- goes to epsanet extract
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

_MEASURE = '''import resource, sys
from epsanet.cli import main
rc = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)
'''


def write_pngs(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(count)
    for i in range(count):
        sub = folder / f'{i // 1000:03d}'
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f'{i:06d}.png')


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--counts', type=int, nargs='+', default=[1000, 4000])
    parser.add_argument('--img-size', type=int, default=64, help='size of the generated images and of the input')
    parser.add_argument('--stages', default='1', help='--stages of epsanet extract ("" for pooled pre-logits)')
    parser.add_argument('--output-kind', choices=('folder', 'npy'), default='folder')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('-j', '--workers', type=int, default=0)
    args = parser.parse_args(argv)
    print(f'epsanet extract, {"--stages " + args.stages if args.stages else "pooled pre-logits"}, '
          f'{args.img_size} px, batch {args.batch_size}, workers {args.workers}, output {args.output_kind}')
    print('| images | output | img/s | peak RSS | peak RSS of a worker |')
    print('|---:|---:|---:|---:|---:|')
    for count in args.counts:
        with tempfile.TemporaryDirectory(prefix='epsanet-bench-') as tmp:
            data, out = Path(tmp) / 'images', Path(tmp) / ('out' if args.output_kind == 'folder' else 'out.npy')
            write_pngs(data, count, args.img_size)
            cmd = [sys.executable, '-c', _MEASURE, 'extract', '--data-dir', str(data), '--output', str(out),
                   '--img-size', str(args.img_size), '-b', str(args.batch_size), '-j', str(args.workers),
                   '--no-progress', *(['--stages', *args.stages.split()] if args.stages else []), *extra]
            start = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            wall = time.perf_counter() - start
            if run.returncode:
                print(run.stderr[-3000:], file=sys.stderr)
                return run.returncode
            rate = re.search(r'rank 0: \d+ images in [\d.]+s \(([\d.]+) img/s\)', run.stderr)
            rss, child = (int(v) / 1024 for v in run.stdout.split('MAXRSS_KB')[1].split()[:2])
            size = du(out) + (du(Path(f'{out.with_suffix("")}.paths.txt')) if args.output_kind == 'npy' else 0)
            print(f'| {count} | {size / 2 ** 20:.0f} MiB | {rate.group(1) if rate else "?"} | {rss:.0f} MiB | '
                  f'{child:.0f} MiB |' if args.workers else
                  f'| {count} | {size / 2 ** 20:.0f} MiB | {rate.group(1) if rate else "?"} | {rss:.0f} MiB | - |',
                  flush=True)
            print(f'  ({wall:.1f}s wall including start-up)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
