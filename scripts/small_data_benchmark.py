"""Small-data benchmark: `epsanet train` with its defaults against a plain PyTorch loop, from scratch.

Builds five small real image sets from images and fonts that installed packages ship inside their
wheels (nothing is downloaded), trains EPSANet-50 from random init on each over several seeds:

* ``defaults``: ``epsanet train`` as a user runs it, through its Python API: data, model, image size
  and ``--epochs``, no recipe flag (no optimizer, lr, batch size, augmentation, schedule or evaluation
  flag): what the data-dependent defaults pick;
* ``auto``: the same without ``--epochs``: the run length the defaults pick too;
* ``plain``: a plain PyTorch loop written below (same model, data and seeds; AdamW, lr 1e-3, batch 16,
  cosine decay per epoch, random horizontal flip only, resize without crop at evaluation, plain
  cross-entropy).

It prints the final-epoch validation top-1 of every seed, the epochs the defaults spent at chance,
and the time. Targets, on every set and for both recipe arms: the mean >= the plain loop's mean - 3
points, and no seed below the plain loop's mean - 5.

The sets (ImageFolders written under ``--root``); training and validation patches come from disjoint
cells of each photograph:

* ``digits``: scikit-learn's 8x8 handwritten digits, 10 classes, upscaled to 32 px, grey; 150/300 images;
* ``textures``: 96 px patches of scikit-image's brick, grass and gravel photographs, 3 classes,
  at 48 px, grey; 150/180 images;
* ``photos``: 128 px patches of five colour photographs (scikit-image's astronaut, coffee and
  rocket; scikit-learn's china and flower), 5 classes "which photograph", at 32 px; 150/200 images;
* ``glyphs`` (added before the recipe chose batch, lr and epochs): the 26 capital letters drawn in
  the fonts matplotlib ships, 10 fonts for training and 6 others (other styles) for validation, at a
  random size, angle and offset, 26 classes, 32 px, grey; 260/156 images;
* ``science`` (added with ``glyphs``): 96 px patches of four colour images of different kinds from
  scikit-image (immunohistochemistry stain, retina fundus, Hubble deep field, a street scene), 4
  classes, at 64 px; 64/80 images.

    OMP_NUM_THREADS=2 python scripts/small_data_benchmark.py
    python scripts/small_data_benchmark.py --sets textures --seeds 0 --arms defaults --recipe --scale 0.08 1
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


# the fonts matplotlib ships: letters in 10 of them train, in 6 others (other styles) validate
GLYPH_FONTS = dict(
    train=('DejaVuSans', 'DejaVuSans-Bold', 'DejaVuSans-Oblique', 'DejaVuSansMono', 'DejaVuSerif', 'DejaVuSerif-Bold',
           'STIXGeneral', 'STIXGeneralBol', 'cmr10', 'cmss10'),
    val=('DejaVuSansMono-BoldOblique', 'DejaVuSerif-Italic', 'STIXGeneralItalic', 'cmb10', 'cmti10', 'cmtt10'))


def build_glyphs(root: Path) -> None:
    """The 26 capital letters drawn in each font at a random size (60-85% of the frame), angle (+-10 degrees)
    and offset (+-3 px), black on white, at 32 px."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    fonts = Path(matplotlib.get_data_path()) / 'fonts' / 'ttf'
    rng = np.random.default_rng(0)
    canvas = 48
    for split, names in GLYPH_FONTS.items():
        for f, name in enumerate(names):
            for letter in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ':
                font = ImageFont.truetype(str(fonts / f'{name}.ttf'), int(canvas * rng.uniform(0.6, 0.85)))
                img = Image.new('L', (canvas, canvas), 255)
                dx, dy = rng.integers(-3, 4, size=2)
                ImageDraw.Draw(img).text((canvas / 2 + dx, canvas / 2 + dy), letter, font=font, fill=0, anchor='mm')
                img = img.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, fillcolor=255)
                _save(root, split, letter, f, np.asarray(img), 32)


def build_science(root: Path) -> None:
    """96 px patches of four colour images of different kinds, 4 classes "which image", at 64 px:
    scikit-image's immunohistochemistry stain, retina fundus (its central 1000 px: no black border),
    Hubble deep field and a street scene (the left view of its stereo motorcycle)."""
    import skimage.data

    photos = dict(ihc=skimage.data.immunohistochemistry(), retina=skimage.data.retina()[205:1205, 205:1205],
                  hubble=skimage.data.hubble_deep_field(), street=skimage.data.stereo_motorcycle()[0])
    _patches(photos, root, patch=96, size=64, per_class=dict(train=16, val=20))


SETS: Dict[str, Tuple[Callable[[Path], None], int]] = {
    'digits': (build_digits, 32), 'textures': (build_textures, 48), 'photos': (build_photos, 32),
    'glyphs': (build_glyphs, 32), 'science': (build_science, 64)}


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


# ---- the trainers --------------------------------------------------------------------------------------------------
def run_defaults(data: Path, img_size: int, seed: int, epochs: Optional[int], out: Path, extra: Sequence[str]) -> Dict:
    """``epsanet train`` as a user runs it: data, model, size and (unless ``None``) the epochs; no recipe flag.
    ``--workers 0``, ``--seed``, ``--output``, ``--overwrite`` (a rerun replaces its run) and ``--no-progress``
    only run it here; ``extra`` adds flags (experiments). A run that stops with an error (e.g. fewer images than
    one batch) counts as 0%."""
    argv = ['--data-dir', str(data), '--model', 'epsanet50', '--img-size', str(img_size),
            *(['--epochs', str(epochs)] if epochs else []),
            '--workers', '0', '--seed', str(seed), '--output', str(out), '--overwrite', '--no-progress', *extra]
    cfg: TrainConfig = parse_config(TrainConfig, argv)
    try:
        result = train(cfg)
    except epsanet.EpsanetError as e:
        return dict(top1=0.0, curve=[], error=str(e))
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


ARMS = ('defaults', 'auto', 'plain')  # fixed --epochs, --epochs unset, the plain loop


def run_set(name: str, args: argparse.Namespace) -> Dict:
    """Every trainer of ``args.arms`` over every seed on the set ``name``."""
    _setup_logging()
    root = Path(args.root)
    data = build(name, root)
    img_size = SETS[name][1]
    n_classes = len(ImageFolder(data / 'train').classes)
    res = dict(top1={}, dead={}, epochs={}, seconds={}, errors=[])
    for arm in args.arms:
        start = time.perf_counter()
        res['top1'][arm], res['dead'][arm], res['epochs'][arm] = [], [], []
        for seed in args.seeds:
            if arm == 'plain':
                r = run_plain(data, img_size, seed, args.epochs)
            else:
                r = run_defaults(data, img_size, seed, args.epochs if arm == 'defaults' else None,
                                 root / 'runs' / f'{name}-{arm}-{seed}', args.recipe)
                res['dead'][arm].append(dead_epochs(r['curve'], n_classes))
                res['epochs'][arm].append(len(r['curve']))
            res['top1'][arm].append(r['top1'])
            if r.get('error'):
                res['errors'].append(f'{arm} seed {seed}: {r["error"]}')
            curve = f' (per epoch: {" ".join(f"{v:.0f}" for v in r["curve"])})' if r.get('curve') else ''
            error = f' ERROR {r["error"]}' if r.get('error') else ''
            print(f'{name} seed {seed}: {arm} {r["top1"]:.2f}%{curve}{error}', flush=True)
        res['seconds'][arm] = time.perf_counter() - start
    return res


def check_targets(res: Dict) -> Dict[str, bool]:
    """Per recipe arm: mean >= the plain loop's mean - 3 points and every seed >= the plain mean - 5."""
    plain = res['top1'].get('plain')
    if not plain:
        return {}
    ref = statistics.mean(plain)
    return {arm: statistics.mean(v) >= ref - 3 and min(v) >= ref - 5
            for arm, v in res['top1'].items() if arm != 'plain' and v}


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
    parser.add_argument('--epochs', type=int, default=12, help='epochs of the plain loop and the "defaults" arm')
    parser.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS),
                        help='defaults: epsanet train with --epochs; auto: without --epochs; plain: the plain loop')
    parser.add_argument('--root', default='output/small_data', help='where the sets and runs are written')
    parser.add_argument('--recipe', nargs=argparse.REMAINDER, default=[],
                        help='extra `epsanet train` flags for the defaults run (experiments), e.g. --recipe --scale '
                             '0.08 1; must come last')
    parser.add_argument('--json', default='', help='also write the results here')
    parser.add_argument('--jobs', type=int, default=1, help='sets trained in parallel processes (one core each)')
    args = parser.parse_args(argv)
    _setup_logging()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f'epsanet {epsanet.__version__}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads per job, {cpu_name()}, {os.cpu_count()} CPUs, '
          f'{args.epochs} epochs (plain, defaults), plain batch {BATCH_SIZE}, seeds {args.seeds}, '
          f'{args.jobs} parallel jobs' + (f', extra flags {" ".join(args.recipe)}' if args.recipe else ''), flush=True)
    print('command: python ' + ' '.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]), flush=True)
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
    seeds = ' | '.join(f'seed {s}' for s in args.seeds)
    print(f'\n| set | trainer | epochs | {seeds} | mean | target met | dead epochs | time |')
    print('|---|---|---:|' + '---:|' * len(args.seeds) + '---:|---|---:|---:|')
    missed = []
    for name, res in results.items():
        res['targets_met'] = check_targets(res)
        for arm, values in res['top1'].items():
            epochs = sorted(set(res['epochs'].get(arm) or [args.epochs]))
            met = res['targets_met'].get(arm)
            print(f'| {name} | {arm} | {"/".join(map(str, epochs))} | {" | ".join(f"{v:.1f}" for v in values)} | '
                  f'{statistics.mean(values):.1f} | {"" if met is None else "yes" if met else "NO"} | '
                  f'{" ".join(map(str, res["dead"].get(arm, [])))} | {res["seconds"][arm]:.0f} s |')
            if met is False:
                missed.append(f'{name} ({arm})')
        for error in res['errors']:
            print(f'  {name}: {error}')
    print(f'\ntotal {total / 60:.1f} min; targets (mean >= plain mean - 3, every seed >= plain mean - 5) '
          f'{"MISSED on: " + ", ".join(missed) if missed else "met on every set"}')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=results, total_s=total, argv=sys.argv[1:]), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
