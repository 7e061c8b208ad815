"""What the model looks at (``epsanet explain``): Grad-CAM and PSA's kernel-size attention, per image.

For each image, one forward and one backward pass of the model (through hooks, nothing in the
model changes) give

* **Grad-CAM** on the last stage (``layer4``) for the predicted class or a chosen one: the stage's
  feature maps weighted by the spatially averaged gradient of the class logit, ReLU, upsampled
  to the model input's size and scaled to [0, 1];
* **PSA's branch attention**: in every PSA layer the shared SE module (``se``) returns sigmoid
  weights for each branch; the softmax over the branches is the attention PSA gives each kernel
  size, per channel. The weights are reported in ``kernel_sizes`` order (3, 5, 7, 9), per block
  and channel, and as the mean per stage and kernel size.

:func:`explain` writes, per image, ``<name>.png`` (the image as the model sees it, the Grad-CAM
overlay and a bar chart of the mean branch weight per kernel size and stage) and ``<name>.npz``
with the arrays.
"""
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .app.data import expand_inputs
from .app.errors import ConfigError
from .app.flags import arg
from .app.model import InferenceModelOptions, load_for_inference
from .app.outputs import check_new, check_not_input, config_inputs, overwrite_option
from .data import DataError, load_image
from .data.image import UNREADABLE_ERRORS
from .files import atomic_write
from .progress import progress

__all__ = ['ExplainConfig', 'Explanation', 'explain', 'explain_tensor', 'psa_modules', 'plot_explanation']

_logger = logging.getLogger(__name__)

E = 'explanation'
_STAGE = re.compile(r'(?:^|\.)layer(\d+)\.')


@dataclasses.dataclass
class ExplainConfig(InferenceModelOptions):
    """Options of :func:`explain`."""
    inputs: Tuple[str, ...] = arg((), 'image files, folders (searched recursively) or glob patterns', E, metavar='PATH')
    output_dir: str = arg('explain', 'folder for <image>.png and <image>.npz', E)
    target_class: str = arg('', 'explain this class (a name or an index) instead of the predicted one', E)
    layer: str = arg('layer4', 'the stage Grad-CAM looks at (layer1-layer4; the last stage by default). Below 64 px '
                               'stage 4 is a 1x1 map and its Grad-CAM is flat: use a larger --img-size or layer3', E)
    device: str = arg('', 'device (default: cuda if available, else cpu)', E)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping them', E)
    overwrite: bool = overwrite_option(E)
    progress: bool = arg(True, 'show a progress bar', E)


@dataclasses.dataclass
class Explanation:
    """Grad-CAM and PSA attention of one image (batch of one)."""
    cam: np.ndarray  # [H, W] in [0, 1], the model input's size
    target: int  # the explained class index
    probs: np.ndarray  # [num_classes] softmax of the logits
    kernel_sizes: List[int]
    branch_weights: Dict[str, np.ndarray]  # PSA module name -> [S, C] softmax weights (kernel_sizes order)
    stage_means: np.ndarray  # [num_stages, S]: mean branch weight per stage (rows: stages in `stages`)
    stages: List[int]
    layer: str = 'layer4'


def psa_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every PSA layer of ``model`` (a module with ``se`` and ``kernel_sizes``)."""
    import epsanet

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, epsanet.PyramidSqueezeAttention) or (hasattr(m, 'se') and hasattr(m, 'kernel_sizes'))]


def _kernel_sizes(psa: torch.nn.Module) -> List[int]:
    return [int(k) for k in psa.kernel_sizes]


def _collect_branch_weights(outputs: List[torch.Tensor], batch: int, num_branches: int) -> torch.Tensor:
    """``[N, S, C]`` softmax weights in kernel_sizes order from what one PSA's ``se`` returned.

    One batched call gives ``[N*S, C, 1, 1]``, one call per branch gives S ``[N, C, 1, 1]``; in both
    the branches come in PSA's concatenation order, which is **reversed** (the largest kernel
    first, spec step 5), so the branch axis is flipped back to ``kernel_sizes`` order here.
    """
    if len(outputs) == 1:
        sig = outputs[0].reshape(batch, num_branches, -1)
    elif len(outputs) == num_branches:
        sig = torch.stack([o.reshape(batch, -1) for o in outputs], dim=1)
    else:
        raise RuntimeError(f'a PSA SE module was called {len(outputs)} times for {num_branches} branches.')
    return sig.float().softmax(dim=1).flip(1)


def explain_tensor(model: torch.nn.Module, x: torch.Tensor, target: Optional[int] = None,
                   layer: str = 'layer4') -> Explanation:
    """Grad-CAM on ``model.<layer>`` and PSA branch attention for a batch of one image ``x`` ([1, 3, H, W])."""
    if x.shape[0] != 1:
        raise ValueError(f'explain_tensor takes one image at a time, got a batch of {x.shape[0]}.')
    model.eval()
    stage_module = model.get_submodule(layer)
    psas = psa_modules(model)
    captured: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in psas}
    acts: List[torch.Tensor] = []
    handles = []
    try:
        for name, psa in psas:
            handles.append(psa.se.register_forward_hook(
                lambda _m, _i, out, name=name: captured[name].append(out.detach())))

        handles.append(stage_module.register_forward_hook(lambda _m, _i, out: acts.append(out)))
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # a graph to the stage even with frozen parameters
            target = int(logits.argmax(dim=1)) if target is None else int(target)
            if not 0 <= target < logits.shape[1]:
                raise ConfigError(f'target class {target} is out of range: the model has {logits.shape[1]} classes.')
            act = acts[-1]
            grad, = torch.autograd.grad(logits[0, target], act)  # leaves the parameters' .grad alone
    finally:
        for h in handles:
            h.remove()
    act = act.detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode='bilinear', align_corners=False)[0, 0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    branch, per_stage = {}, {}
    kernel_sizes: List[int] = []
    for name, psa in psas:
        ks = _kernel_sizes(psa)
        kernel_sizes = kernel_sizes or ks
        w = _collect_branch_weights(captured[name], 1, len(ks))[0]  # [S, C]
        branch[name] = w.cpu().numpy()
        m = _STAGE.search(name + '.')
        if m and ks == kernel_sizes:
            per_stage.setdefault(int(m.group(1)), []).append(w.mean(dim=1))
    stages = sorted(per_stage)
    means = np.stack([torch.stack(per_stage[s]).mean(0).cpu().numpy() for s in stages]) if stages else \
        np.zeros((0, len(kernel_sizes)))
    return Explanation(cam.cpu().numpy().astype(np.float32), target,
                       logits.detach().float().softmax(dim=1)[0].cpu().numpy(), kernel_sizes, branch, means, stages,
                       layer)


def plot_explanation(image: np.ndarray, exp: Explanation, path: str, title: str = '') -> None:
    """One PNG: the image, the Grad-CAM overlay, and the mean PSA weight per kernel size for each stage."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw=dict(width_ratios=[1, 1, 1.4]))
    axes[0].imshow(image)
    axes[0].set_title('input (as the model sees it)', fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(exp.cam, cmap='jet', alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(f'Grad-CAM, {exp.layer}', fontsize=9)
    for ax in axes[:2]:
        ax.axis('off')
    ax = axes[2]
    s = len(exp.kernel_sizes)
    width = 0.8 / max(s, 1)
    xs = np.arange(len(exp.stages))
    for j, k in enumerate(exp.kernel_sizes):
        ax.bar(xs + (j - (s - 1) / 2) * width, exp.stage_means[:, j], width, label=f'{k}x{k}')
    uniform = 1 / max(s, 1)
    ax.axhline(uniform, color='grey', lw=0.8, ls='--')
    ax.set_xticks(xs, [f'stage {st}' for st in exp.stages])
    ax.set_ylabel('mean softmax weight')
    chart_title = 'PSA attention per kernel size (dashed: uniform)'
    spread = float(np.abs(exp.stage_means - uniform).max()) if exp.stage_means.size else 0.0
    if 0 < spread < 0.1 * uniform:  # near-uniform weights: zoom in so the differences show
        ax.set_ylim(uniform - 1.6 * spread, uniform + 1.6 * spread)
        chart_title += ', y zoomed'
    ax.set_title(chart_title, fontsize=9)
    ax.legend(fontsize=8, ncol=s)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format='png', dpi=80)
    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def _save_arrays(path: Path, image: np.ndarray, exp: Explanation, label: str) -> None:
    arrays = dict(image=image, cam=exp.cam, probs=exp.probs, target=np.array(exp.target),
                  target_label=np.array(label), kernel_sizes=np.array(exp.kernel_sizes),
                  stages=np.array(exp.stages), stage_means=exp.stage_means)
    arrays.update({f'psa/{name}': w for name, w in exp.branch_weights.items()})

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def _target_index(target: str, classes: Sequence[str], num_classes: int) -> Optional[int]:
    if target == '':
        return None
    if target in classes:
        return list(classes).index(target)
    if target.lstrip('-').isdigit() and 0 <= int(target) < num_classes:
        return int(target)
    raise ConfigError(f'--target-class {target}: not a class name ({", ".join(list(classes)[:10])}) or an index '
                      f'0-{num_classes - 1}.')


def _output_stems(paths: Sequence[str]) -> List[str]:
    """The output name of each image: its stem, ``<stem>_2``, ``<stem>_3``... for repeats."""
    seen: Dict[str, int] = {}
    stems = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem]}')
    return stems


def explain(cfg: ExplainConfig) -> List[Dict[str, Any]]:
    """Write ``<output_dir>/<image stem>.png`` and ``.npz`` for every input image; return what was written."""
    from timm.data import create_transform

    if not cfg.inputs:
        raise ConfigError('nothing to explain: give image files, folders or glob patterns.')
    paths = expand_inputs(cfg.inputs)
    out_dir = Path(cfg.output_dir)
    stems = _output_stems(paths)
    check_not_input([out_dir], config_inputs(cfg, *paths), '--output-dir')
    check_new([out_dir / f'{stem}{ext}' for stem in stems for ext in ('.png', '.npz')], cfg.overwrite,
              '--output-dir')
    model, data_config, meta = load_for_inference(cfg)
    classes = list(meta.get('classes') or [])
    if len(classes) != model.num_classes:
        classes = [str(i) for i in range(model.num_classes)]
    target = _target_index(cfg.target_class, classes, model.num_classes)
    try:
        model.get_submodule(cfg.layer)
    except AttributeError as e:
        raise ConfigError(f'--layer {cfg.layer}: the model has no such module; use layer1, layer2, layer3 or layer4.') \
            from e
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model.to(device).requires_grad_(False)  # gradients flow to the activations only
    transform = create_transform(**data_config)
    mean = torch.tensor(data_config['mean']).view(3, 1, 1)
    std = torch.tensor(data_config['std']).view(3, 1, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path, stem in progress(list(zip(paths, stems)), desc='explain', unit='img', enabled=cfg.progress):
        try:
            img = load_image(path)
        except UNREADABLE_ERRORS as e:
            if cfg.strict:
                raise DataError(f'cannot read image {path} ({e}); remove it or drop --strict.') from e
            _logger.warning('skipped unreadable image %s (%s)', path, e)
            skipped.append(path)
            continue
        x = transform(img)
        exp = explain_tensor(model, x[None].to(device), target, layer=cfg.layer)
        shown = ((x.detach() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        label = classes[exp.target]
        title = f'{Path(path).name}: {label} ({100 * exp.probs[exp.target]:.1f}%)' + (
            '' if target is None else ' [--target-class]')
        png, npz = out_dir / f'{stem}.png', out_dir / f'{stem}.npz'
        plot_explanation(shown, exp, str(png), title)
        _save_arrays(npz, shown, exp, label)
        written.append(dict(image=path, png=str(png), npz=str(npz), target=exp.target, label=label,
                            prob=float(exp.probs[exp.target])))
    if not written:
        raise DataError(f'none of the {len(paths)} images could be read.')
    if skipped:
        _logger.warning('%d unreadable images were skipped: %s', len(skipped), ', '.join(skipped))
    return written
