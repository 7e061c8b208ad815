"""``epsanet convert``: any supported weights file -> a Hub-ready, verified timm folder.

The folder holds ``model.safetensors``, ``config.json`` (timm's format, written by timm's
``save_for_hf``), ``model.safetensors.sha256`` (``sha256sum -c`` format), a ``README.md`` model card
and ``registry_entry.json``, the draft of the registry entry that ``epsanet push`` completes. The
folder is reloaded with ``timm.create_model("local-dir:...")`` and must reproduce the source's logits.
"""
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .._compat import save_for_hf_takes_data_config
from ..models.flops import count_gflops
from ..models.variants import infer_variant
from ..progress import progress as progress_bar
from .loading import WeightsError, _pick_state_dict, read_checkpoint, sha256_file
from .metadata import read_weights_metadata
from .model_card import dumps, render_model_card

__all__ = ['ConvertResult', 'convert', 'infer_architecture', 'read_label_names']

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
ENTRY_NAME = 'registry_entry.json'


@dataclass
class ConvertResult:
    """What ``convert`` wrote and checked."""
    out_dir: Path
    model: str
    num_classes: int
    in_chans: int
    params: int
    gflops: float
    sha256: str
    file_size: int
    max_abs_diff: float
    entry: Dict[str, Any] = field(default_factory=dict)
    label_names: Optional[List[str]] = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def infer_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Which EPSANet a state dict belongs to (timm or authors' names), from its shapes; None if unknown
    (:func:`epsanet.models.variants.infer_variant`: blocks per stage and the first block's width)."""
    return infer_variant(state_dict)


def _label_names(src: Path, given: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The class names to publish: ``given``, else those an ``epsanet train`` checkpoint records; checked."""
    names, origin = (list(given), 'the given label names') if given else (None, '')
    if names is None and src.suffix == '.safetensors':
        recorded = read_weights_metadata(src).get('classes')
        names, origin = (list(recorded), f'the classes recorded in {src}') if recorded else (None, '')
    if names is None:
        _logger.warning('no class names for %s: config.json gets no label_names (labels will be indices). Give '
                        'them with label_names= (--label-names FILE).', src)
        return None
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise WeightsError(f'{origin} list {len(names)} classes but the weights have {num_classes}; give one name '
                           'per classifier output, in index order.')
    if len(set(names)) != len(names):
        raise WeightsError(f'{origin} repeat names ({", ".join(sorted({n for n in names if names.count(n) > 1}))}); '
                           'each class needs its own name.')
    return names


def _recorded_data_config(src: Path) -> Optional[Dict[str, Any]]:
    """The eval preprocessing an ``epsanet train`` checkpoint records (size, crop, interpolation, mean, std),
    for config.json: without it the folder would be read at the model's default 224 px."""
    if src.suffix != '.safetensors':
        return None
    meta = read_weights_metadata(src)
    config = {k: meta[k] for k in ('img_size', 'crop_pct', 'interpolation', 'mean', 'std') if meta.get(k)}
    for k in ('mean', 'std'):
        if k in config:
            config[k] = tuple(config[k])
    return config or None


def read_label_names(path: Union[str, Path]) -> List[str]:
    """Class names from a text file, one per line in index order (blank lines ignored), as timm's class maps."""
    try:
        lines = Path(path).read_text(encoding='utf-8').splitlines()
    except OSError as e:
        raise WeightsError(f'cannot read the label names file {path}: {e}') from e
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise WeightsError(f'the label names file {path} is empty; write one class name per line.')
    return names


def _drop_repeated_model_args(config_path: Path) -> None:
    """Remove ``num_classes`` from config.json's ``model_args``: it is already at the top level, and
    transformers' timm wrapper passes ``num_classes`` itself, so a second one breaks
    ``AutoModelForImageClassification.from_pretrained`` (timm reads the top-level value)."""
    import json

    config = json.loads(config_path.read_text())
    args = config.get('model_args')
    if isinstance(args, dict) and 'num_classes' in args:
        del args['num_classes']
        if not args:
            del config['model_args']
        config_path.write_text(json.dumps(config, indent=2))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_file():
        raise WeightsError(f'{out_dir} is a file; give a folder to write the converted weights into.')
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise WeightsError(f'{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) '
                           'or choose another folder.')


def _draft_entry(model: str, tag: Optional[str], sha256: str, size: int, num_classes: int,
                 license_: Optional[str], provenance: Dict[str, Any], metrics: Optional[Dict[str, Any]]):
    return {
        'model': model, 'tag': tag, 'source': None, 'sha256': sha256, 'file_size': size,
        'num_classes': num_classes, 'license': license_, 'provenance': provenance, 'metrics': metrics,
    }


def convert(
        src: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: Optional[str] = None,
        tag: Optional[str] = None,
        license: Optional[str] = None,
        provenance: Optional[Dict[str, Any]] = None,
        metrics: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
        check_img_size: int = 64,
        progress: bool = True,
        label_names: Optional[Sequence[str]] = None,
) -> ConvertResult:
    """Convert ``src`` (authors' checkpoint, timm state dict, training checkpoint, safetensors) to ``out_dir``.

    Args:
        src: the weights file.
        out_dir: folder to create (must be empty or absent unless ``overwrite``).
        model_name: one of ``epsanet.MODEL_NAMES``; inferred from the checkpoint's shapes when None.
            A wrong name fails with the list of mismatched keys.
        tag: the pretrained tag the weights would get in the registry (e.g. ``in1k``).
        license: licence of the weights (e.g. ``mit``, ``apache-2.0``), written to the card and entry.
        provenance: who trained them, recipe/config, data, notes (free-form keys).
        metrics: results of ``epsanet validate`` (``top1``, ``top5``, ``img_size``, optional ``crop_pct``,
            ``dataset``, ``command``).
        overwrite: replace the files of an existing folder.
        check_img_size: image size of the logits check between the source and the reloaded folder.
        progress: show a progress bar over the steps.
        label_names: the class names, one per classifier output, in index order; by default the
            ``classes`` an ``epsanet train`` checkpoint records. Written to config.json as timm's
            ``label_names`` (timm's ``pretrained_cfg["label_names"]``, transformers' ``id2label``) and
            to the model card.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f'No weights file at {src}.')
    _check_out_dir(out_dir, overwrite)
    with progress_bar(total=5, desc='convert', enabled=progress, unit='step') as steps:
        result = _convert(src, out_dir, model_name, tag, license, provenance, metrics, check_img_size, steps,
                          label_names)
    _logger.info(f'Wrote {out_dir} ({result.model}, {result.num_classes} classes, sha256 {result.sha256}); '
                 f'logits match the source (max |diff| {result.max_abs_diff:.2e}).')
    return result


def _convert(src: Path, out_dir: Path, model_name: Optional[str], tag: Optional[str], license: Optional[str],
             provenance: Optional[Dict[str, Any]], metrics: Optional[Dict[str, Any]], check_img_size: int,
             steps: Any, label_names: Optional[Sequence[str]] = None) -> ConvertResult:
    import timm
    from timm.models import save_for_hf
    if not save_for_hf_takes_data_config():
        raise WeightsError(f'epsanet convert needs timm>=1.0.31 (save_for_hf with data_config); this is timm '
                           f'{timm.__version__}: pip install -U "timm>=1.0.31".')

    import epsanet

    steps.set_description('convert: read')
    raw = read_checkpoint(src)
    state_dict = _pick_state_dict(raw, src)
    inferred = infer_architecture(state_dict)
    model_name = model_name or inferred
    if model_name is None:
        raise WeightsError(f'Cannot tell which EPSANet {src} holds; name it with model_name= (--model), '
                           f'one of {list(epsanet.MODEL_NAMES)}.')
    if model_name not in epsanet.MODEL_NAMES:
        raise WeightsError(f'Unknown model {model_name!r}; choose one of {list(epsanet.MODEL_NAMES)}.')
    steps.update()

    steps.set_description('convert: build')
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict)).eval()
    model.pretrained_cfg.update(tag=tag, license=license)
    num_classes, in_chans = model.num_classes, model.conv1.in_channels
    label_names = _label_names(src, label_names, num_classes)
    data_config = _recorded_data_config(src)
    steps.update()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        steps.set_description('convert: save')
        save_for_hf(model, str(tmp), model_config=dict(label_names=label_names) if label_names else None,
                    data_config=data_config, safe_serialization=True)
        _drop_repeated_model_args(tmp / CONFIG_NAME)
        steps.update()

        steps.set_description('convert: check')
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, in_chans, check_img_size, check_img_size, generator=gen)
        reloaded = timm.create_model(f'local-dir:{tmp}', pretrained=True).eval()
        with torch.no_grad():
            expected, got = model(x), reloaded(x)
        max_abs_diff = float((expected - got).abs().max())
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=1e-5):
            raise WeightsError(f'The converted folder does not reproduce the source logits (max |diff| '
                               f'{max_abs_diff:.3g}); nothing was written to {out_dir}.')
        steps.update()

        steps.set_description('convert: card')
        sha, size = sha256_file(tmp / WEIGHTS_NAME), (tmp / WEIGHTS_NAME).stat().st_size
        params = sum(p.numel() for p in model.parameters())
        shape_only = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans, device='meta')
        gflops = count_gflops(shape_only, 224, in_chans)
        prov = dict(provenance or {})
        if isinstance(raw, dict) and 'arch' in raw and 'epoch' in raw:
            prov.setdefault('notes', f'authors\' checkpoint format (arch {raw["arch"]}, epoch {raw["epoch"]})')
        metrics = dict(metrics) if metrics else None
        if metrics is not None:
            metrics.setdefault('crop_pct', model.pretrained_cfg.get('crop_pct'))
        entry = _draft_entry(model_name, tag, sha, size, num_classes, license, prov, metrics)
        (tmp / f'{WEIGHTS_NAME}.sha256').write_text(f'{sha}  {WEIGHTS_NAME}\n')
        (tmp / ENTRY_NAME).write_text(dumps(entry))
        (tmp / 'README.md').write_text(render_model_card(dict(
            model=model_name, tag=tag, num_classes=num_classes, in_chans=in_chans, params=params, gflops=gflops,
            sha256=sha, file_size=size, license=license, provenance=prov, metrics=metrics,
            source_name=src.name, source_sha256=sha256_file(src), max_abs_diff=max_abs_diff,
            label_names=label_names)))

        out_dir.mkdir(parents=True, exist_ok=True)
        mode = 0o666 & ~_umask()
        for f in sorted(tmp.iterdir()):
            f.chmod(mode)
            f.replace(out_dir / f.name)  # same file system: each file appears atomically
        steps.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(out_dir, model_name, num_classes, in_chans, params, gflops, sha, size, max_abs_diff, entry,
                         label_names)
