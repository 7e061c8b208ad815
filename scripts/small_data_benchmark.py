"""Small-data benchmark: `epsanet train` with its defaults against a plain PyTorch loop, from scratch.

Builds three small real image sets from images that installed packages ship (nothing is
downloaded), trains EPSANet-50 from random init on each over several seeds, twice:

* ``defaults``: ``epsanet train`` through its Python API with the optimiser and schedule of a
  typical user command (``--opt adamw --lr 1e-3 --weight-decay 0.05 --sched cosine``) and no
  augmentation, evaluation or warm-up flags: what the data-dependent defaults pick;
* ``plain``: a plain PyTorch loop written below (same model, AdamW, cosine decay, data and seeds;
  random horizontal flip only, resize without crop at evaluation, plain cross-entropy).

It prints the final-epoch validation top-1 per set (mean, min, max over seeds), the epochs the
defaults spent at chance, and the time. Targets: on every set the defaults' mean >= the plain
loop's mean - 2 points, and the worst seed within 5 points of the mean.

The sets (ImageFolders written under ``--root``):

* ``digits``: scikit-learn's 8x8 handwritten digits, 10 classes, upscaled to 32 px, grey;
* ``textures``: 96 px patches of scikit-image's brick, grass and gravel photographs, 3 classes,
  at 48 px, grey;
* ``photos``: 128 px patches of five colour photographs (scikit-image's astronaut, coffee and
  rocket; scikit-learn's china and flower), 5 classes "which photograph", at 32 px.

Training and validation patches come from disjoint cells of each photograph.

    OMP_NUM_THREADS=2 python scripts/small_data_benchmark.py            # ~15 minutes on 2 cores
    python scripts/small_data_benchmark.py --sets textures --seeds 0 --set scale=0.08,1.0
"""
# ruff: noqa: E402
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see Makefile: spinning OpenMP threads starve each other

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms

import epsanet
from epsanet.app.flags import parse_config
from epsanet.data import ImageFolder
from epsanet.train import TrainConfig, train

BATCH_SIZE = 16
LR = 1e-3
WEIGHT_DECAY = 0.05
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the model's (timm's ImageNet) normalisation


# ---- data sets -------------------------------------------------------------------------------------------------------
def _save(root: Path, split: str, cls: str, index: int, pixels: np.ndarray, size: int) -> None:
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    img.resize((size, size), Image.BICUBIC).save(folder / f'{index:04d}.png')


def _patches(photos: Dict[str, np.ndarray], root: Path, patch: int, size: int, per_class: Dict[str, int],
             seed: int = 0) -> None:
    """Random ``patch`` px squares, resized to ``size``: training ones from 6 cells of a 3x3 grid over
    each photograph, validation ones from the other 3 (the cells are drawn per photograph)."""
    rng = np.random.default_rng(seed)
    for cls, pixels in photos.items():
        h, w = pixels.shape[:2]
        ch, cw = h // 3, w // 3
        if min(ch, cw) < patch:
            raise ValueError(f'{cls}: {w}x{h} is too small for {patch} px patches in a 3x3 grid')
        cells = [(r, c) for r in range(3) for c in range(3)]
        order = rng.permutation(len(cells))
        split_cells = dict(train=[cells[i] for i in order[:6]], val=[cells[i] for i in order[6:]])
        for split, count in per_class.items():
            for i in range(count):
                r, c = split_cells[split][i % len(split_cells[split])]
                y = r * ch + rng.integers(0, ch - patch + 1)
                x = c * cw + rng.integers(0, cw - patch + 1)
                _save(root, split, cls, i, pixels[y:y + patch, x:x + patch], size)


def build_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        for split, chosen in (('train', idx[:15]), ('val', idx[15:45])):
            for i in chosen:
                _save(root, split, str(label), int(i), images[i], 32)


def build_textures(root: Path) -> None:
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in ('brick', 'grass', 'gravel')}
    _patches(photos, root, patch=96, size=48, per_class=dict(train=50, val=60))


def build_photos(root: Path) -> None:
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {name: getattr(skimage.data, name)() for name in ('astronaut', 'coffee', 'rocket')}
    photos.update({name: load_sample_image(f'{name}.jpg') for name in ('china', 'flower')})
    _patches(photos, root, patch=128, size=32, per_class=dict(train=30, val=40))


SETS: Dict[str, Tuple[Callable[[Path], None], int]] = {
    'digits': (build_digits, 32), 'textures': (build_textures, 48), 'photos': (build_photos, 32)}


def build(name: str, root: Path) -> Path:
    """The set ``name`` under ``root/name`` (built once; a finished set has ``root/name/done``)."""
    folder = root / name
    if not (folder / 'done').is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f'.{name}-', dir=root))
        SETS[name][0](tmp)
        (tmp / 'done').write_text('ok')
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


# ---- the two trainers ------------------------------------------------------------------------------------------------
def run_defaults(data: Path, img_size: int, seed: int, epochs: int, out: Path, extra: Sequence[str]) -> Dict:
    """``epsanet train`` with a user's optimiser flags and nothing else (``extra`` adds flags)."""
    argv = ['--data-dir', str(data), '--model', 'epsanet50', '--img-size', str(img_size), '--epochs', str(epochs),
            '--batch-size', str(BATCH_SIZE), '--opt', 'adamw', '--lr', str(LR), '--weight-decay', str(WEIGHT_DECAY),
            '--sched', 'cosine', '--workers', '0', '--seed', str(seed), '--output', str(out), '--no-progress',
            *extra]
    cfg: TrainConfig = parse_config(TrainConfig, argv)
    result = train(cfg)
    top1 = [row['val_top1'] for row in result.metrics]
    return dict(top1=top1[-1], curve=top1)


def run_plain(data: Path, img_size: int, seed: int, epochs: int) -> Dict:
    """A plain PyTorch loop: flip only, resize (no crop) at evaluation, AdamW, cosine per epoch."""
    torch.manual_seed(seed)
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train_tf = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.RandomHorizontalFlip(), *norm])
    eval_tf = transforms.Compose([transforms.Resize((img_size, img_size)), *norm])
    train_ds, val_ds = ImageFolder(data / 'train', transform=train_tf), ImageFolder(data / 'val', transform=eval_tf)
    model = timm.create_model('epsanet50', num_classes=len(train_ds.classes))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        for images, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in torch.utils.data.DataLoader(val_ds, batch_size=64):
            correct += (model(images).argmax(1) == targets).sum().item()
    return dict(top1=100.0 * correct / len(val_ds))


# ---- report ----------------------------------------------------------------------------------------------------------
def dead_epochs(curve: List[float], num_classes: int) -> int:
    """Leading epochs whose top-1 is within 5 points of chance."""
    chance = 100.0 / num_classes
    n = 0
    for top1 in curve:
        if top1 > chance + 5:
            break
        n += 1
    return n


def summary(values: List[float]) -> str:
    return f'{statistics.mean(values):6.2f} {min(values):6.2f} {max(values):6.2f}'


def run_set(name: str, args: argparse.Namespace) -> Dict:
    """Both trainers over every seed on the set ``name``."""
    _setup_logging()
    root = Path(args.root)
    data = build(name, root)
    img_size = SETS[name][1]
    n_classes = len(ImageFolder(data / 'train').classes)
    res = dict(defaults=[], plain=[], dead=[], seconds={})
    start = time.perf_counter()
    for seed in args.seeds if args.only != 'plain' else ():
        r = run_defaults(data, img_size, seed, args.epochs, root / 'runs' / f'{name}-{seed}', args.recipe)
        res['defaults'].append(r['top1'])
        res['dead'].append(dead_epochs(r['curve'], n_classes))
        print(f'{name} seed {seed}: defaults {r["top1"]:.2f}% (per epoch: '
              f'{" ".join(f"{v:.0f}" for v in r["curve"])})', flush=True)
    res['seconds']['defaults'] = time.perf_counter() - start
    if args.only != 'defaults':
        start = time.perf_counter()
        for seed in args.seeds:
            r = run_plain(data, img_size, seed, args.epochs)
            res['plain'].append(r['top1'])
            print(f'{name} seed {seed}: plain {r["top1"]:.2f}%', flush=True)
        res['seconds']['plain'] = time.perf_counter() - start
    return res


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger('epsanet.train.loop').setLevel(logging.INFO)  # the picked-recipe line and the epochs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sets', nargs='+', default=list(SETS), choices=list(SETS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--root', default='output/small_data', help='where the sets and runs are written')
    parser.add_argument('--recipe', nargs=argparse.REMAINDER, default=[],
                        help='extra `epsanet train` flags for the defaults run (experiments), e.g. --recipe --scale '
                             '0.08 1; must come last')
    parser.add_argument('--only', choices=('defaults', 'plain'), help='run only one of the two trainers')
    parser.add_argument('--json', default='', help='also write the results here')
    parser.add_argument('--jobs', type=int, default=1, help='sets trained in parallel processes (one core each)')
    args = parser.parse_args(argv)
    _setup_logging()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f'epsanet {epsanet.__version__}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads per job, {cpu_name()}, '
          f'{args.epochs} epochs, batch {BATCH_SIZE}, seeds {args.seeds}, {args.jobs} parallel jobs, '
          f'{os.cpu_count()} CPUs' +
          (f', extra flags {" ".join(args.recipe)}' if args.recipe else ''), flush=True)
    for name in args.sets:
        build(name, root)  # once, before any parallel job
    start_all = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context('spawn')
        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(args.sets)), mp_context=ctx) as pool:
            done = pool.map(run_set, args.sets, [args] * len(args.sets))
            results = dict(zip(args.sets, done))
    else:
        results = {name: run_set(name, args) for name in args.sets}
    total = time.perf_counter() - start_all
    print('\n| set | recipe | mean | min | max | dead epochs | time |')
    print('|---|---|---:|---:|---:|---:|---:|')
    ok = True
    for name, res in results.items():
        for recipe in ('defaults', 'plain'):
            if not res[recipe]:
                continue
            mean, lo, hi = (float(v) for v in summary(res[recipe]).split())
            dead = ' '.join(map(str, res['dead'])) if recipe == 'defaults' else ''
            print(f'| {name} | {recipe} | {mean:.1f} | {lo:.1f} | {hi:.1f} | {dead} | '
                  f'{res["seconds"][recipe]:.0f} s |')
        d = res['defaults'] or res['plain']
        checks = [statistics.mean(d) - min(d) <= 5]
        if res['plain'] and res['defaults']:
            checks.append(statistics.mean(d) >= statistics.mean(res['plain']) - 2)
        res['targets_met'] = all(checks)
        ok &= res['targets_met']
    missed = [n for n, r in results.items() if not r['targets_met']]
    print(f'\ntotal {total / 60:.1f} min; targets (defaults mean >= plain mean - 2, worst seed within 5 of the mean) '
          f'{"MISSED on: " + ", ".join(missed) if missed else "met on every set"}')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=results, total_s=total, argv=sys.argv[1:]), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
