"""Tiny synthetic ImageFolders for smoke runs and tests (coloured noise, one colour per class), and the
same images as a tar, a Hugging Face ``datasets`` folder or webdataset shards."""
import os
from pathlib import Path
from typing import Dict, Sequence, Union

import numpy as np
from PIL import Image

__all__ = ['write_image_folder', 'write_tar', 'write_hf_dataset', 'write_wds']


def write_image_folder(
        root: Union[str, os.PathLike],
        classes: Sequence[str] = ('a', 'b', 'c'),
        splits: Dict[str, int] = None,
        size: int = 32,
        seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/<i>.png`` with ``splits[split]`` images per class; return ``root``.

    Each class has its own mean colour plus noise, so a model can learn it in a few steps.
    """
    root = Path(root)
    splits = splits or {'train': 4, 'val': 2}
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (len(classes), 3))
    for split, count in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0, 30, (size, size, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


# ---- the same images in the other formats create_image_dataset reads (for tests and smoke runs) ----

def _class_images(folder: Path):
    paths = sorted(p for p in Path(folder).rglob('*') if p.is_file() and p.suffix.lower() in ('.png', '.jpg'))
    return paths, sorted({p.parent.name for p in paths})


def write_tar(folder: Union[str, os.PathLike], tar_path: Union[str, os.PathLike]) -> Path:
    """``folder/<class>/<image>`` as one tar of ``<class>/<image>`` members (timm's tar reader)."""
    import tarfile

    folder, tar_path = Path(folder), Path(tar_path)
    with tarfile.open(tar_path, 'w') as tar:
        for p in _class_images(folder)[0]:
            tar.add(p, arcname=p.relative_to(folder).as_posix())
    return tar_path


def write_hf_dataset(folder: Union[str, os.PathLike], out: Union[str, os.PathLike], split: str = 'val') -> Path:
    """``folder/<class>/<image>`` as a Hugging Face ``DatasetDict({split: ...}).save_to_disk(out)`` folder
    (``image`` column with the file bytes, ``label`` a ClassLabel of the folder names)."""
    import datasets

    paths, names = _class_images(Path(folder))
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    ds = datasets.Dataset.from_dict(
        dict(image=[{'bytes': p.read_bytes(), 'path': p.name} for p in paths],
             label=[names.index(p.parent.name) for p in paths]), features=features)
    datasets.DatasetDict({split: ds}).save_to_disk(str(out))
    return Path(out)


def write_wds(folder: Union[str, os.PathLike], out: Union[str, os.PathLike], split: str, shards: int = 2,
              classes: Sequence[str] = None) -> Path:
    """``folder/<class>/<image>`` as webdataset shards ``out/<split>-%04d.tar`` (``png``/``jpg`` + ``cls``) and
    timm's ``_info.json`` (split sizes, plus the class names under ``classes``). Returns ``out``."""
    import json

    import webdataset as wds

    paths, found = _class_images(Path(folder))
    classes = list(classes or found)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, lengths = [], []
    for s in range(shards):
        part = paths[s::shards]
        name = f'{split}-{s:04d}.tar'
        with wds.TarWriter(str(out / name)) as sink:
            for p in part:
                sink.write({'__key__': f'{p.parent.name}_{p.stem}', p.suffix.lower()[1:]: p.read_bytes(),
                            'cls': str(classes.index(p.parent.name)).encode()})
        names.append(name)
        lengths.append(len(part))
    info_path = out / '_info.json'
    info = json.loads(info_path.read_text()) if info_path.exists() else {'name': out.name, 'classes': classes,
                                                                        'splits': {}}
    info['splits'][split] = dict(name=split, num_samples=sum(lengths), filenames=names, shard_lengths=lengths)
    info_path.write_text(json.dumps(info, indent=1))
    return out
