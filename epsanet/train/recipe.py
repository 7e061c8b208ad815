"""The training recipe ``epsanet train`` picks when the user gives none: settings that fit the data.

timm's defaults (random-resized crops down to 8% of the image, colour jitter 0.4, a 0.875 centre
crop at evaluation, 5 warm-up epochs) are made for ImageNet: a million images, 224 px, 300 epochs.
No pretrained EPSANet weights exist, so most users train from random init on a few hundred
images of their own, where those defaults are slow and erratic (measured with
``scripts/small_data_benchmark.py``, see the training page). The rules below were picked with that
benchmark (three sets of 150 images at 32-48 px, 12 epochs, AdamW):

* ``scale``: below :data:`LARGE_DATA` training images, no random-resized crop (the whole image, flipped):
  crops of 50-100% of the image gained 7 points on one set (photos) but lost 21-31 on another (digits,
  whose strokes fill the frame), 80-100% still lost 14 there; timm's 8-100% from :data:`LARGE_DATA` on;
* ``color_jitter``: none for grey images (jitter only changes their brightness and contrast) and below
  :data:`LARGE_DATA` images; timm's 0.4 for large colour sets;
* ``crop_pct``: 1.0 (resize, no centre crop at evaluation) at :data:`NO_CROP_MAX_SIZE` px and below,
  where a crop throws away a quarter of the few pixels there are; the model's 0.875 above;
* ``smoothing`` and ``warmup_epochs``: none below :data:`LARGE_DATA` images (on digits, 12 epochs: label
  smoothing 0.1 cost 4 points, 2 warm-up epochs 8); above, timm's 0.1 and a tenth of the epochs (1 to 5);
* ``sched_on_updates`` when there is a warm-up, so that the lr ramps up step by step: per epoch, timm
  holds the whole first epoch at ``--warmup-lr`` (1e-5), an epoch that learns nothing;
* ``bn_recalibrate``: below :data:`LARGE_DATA` images, BatchNorm statistics are recomputed before each
  validation (:mod:`epsanet.train.precise_bn`): with a handful of steps per epoch the running averages
  lag behind the weights and validation sat at chance for epochs while the training loss fell.

How long a run is, how big its steps are and what takes them follows from one principle: **every run gets
enough optimizer steps**, a budget in all and :data:`MIN_STEPS_PER_EPOCH` per epoch, and steps that move a
randomly initialised network within that budget. Nothing here was fitted to a benchmark set:

* ``epochs`` (when not given): as many as give the step budget of the BiT-HyperRule (Kolesnikov et al. 2020,
  "Big Transfer", section 3.3): :data:`STEP_BUDGETS`: 500 optimizer steps below 20 000 training images,
  10 000 below 500 000, 20 000 above; at most timm's :data:`MAX_EPOCHS`. A few hundred images at 10 steps
  per epoch make 50 epochs, not timm's 300;
* ``batch_size``: the largest even batch up to timm's :data:`MAX_BATCH` that gives
  :data:`MIN_STEPS_PER_EPOCH` optimizer steps per epoch on each process (the loader drops the last partial
  batch). When the epochs are given, the batch also shrinks until those epochs hold the step budget, down
  to :data:`BN_BATCH` (16: BatchNorm, which normalises over the batch, degrades below it; Wu & He 2018,
  "Group Normalization", figure 1). Never below :data:`MIN_BATCH`. With timm's 128 on a few hundred images
  an epoch is one or two steps: the lr schedule, the BatchNorm running averages and the per-epoch
  validation then have nothing to work with;
* ``opt``: AdamW below :data:`LARGE_DATA` images, timm's SGD from there on. A few hundred steps of SGD at
  the linear rule's lr (timm's 0.1 per 256 images, set for ImageNet's hundreds of thousands of steps: 0.003
  to 0.05 at batches of 8 to 128) leave a randomly initialised network near where it started; an adaptive
  optimizer's step is set by its lr, not by the size of the gradients (Kingma & Ba 2015). The project's
  small-data configs (``configs/``) use AdamW too;
* ``weight_decay``: the reference value of the optimizer's own recipe (:data:`WEIGHT_DECAYS`): 0.05 for
  decoupled decay (AdamW, LAMB: the DeiT and ConvNeXt recipes, the value timm's AdamW recipes and the
  ``configs/`` use), timm's train.py 2e-5 for the others, whose decay is an L2 term scaled by the lr;
* ``lr``: scaled from a reference by timm's rule for the optimizer (timm's train.py does the same): linear
  for SGD-like optimizers (Goyal et al. 2017) from :data:`LR_REFERENCES` ``['sgd']`` (0.1 per 256 images,
  timm's ``--lr-base``), square root for adaptive ones (Adam*, Lamb, Ada*) from ``['adaptive']``: Adam's
  default step, 1e-3 (Kingma & Ba 2015; PyTorch's default), at :data:`BN_BATCH` images, the batch the
  recipe uses for a few hundred images.
  ``--lr-base``, ``--lr-base-size`` and ``--lr-base-scale`` replace the reference or the rule.

A batch given by the user that leaves fewer than :data:`MIN_STEPS_PER_EPOCH` steps per epoch gets one
warning line naming the smaller batch the rule would pick (none when the rule's batch is not smaller: a
set under :data:`MIN_BATCH` x 10 images). A set smaller than :data:`MIN_BATCH` is one batch.

Only fields left at ``None`` are picked: a value from a flag, ``--config`` or the Python API always
wins. The recipes under ``configs/`` set their augmentation, smoothing and warm-up themselves.
"""
import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..data.image import UNREADABLE_ERRORS

__all__ = ['AUTO_FIELDS', 'STEP_FIELDS', 'DataSummary', 'Schedule', 'summarize', 'pick_schedule', 'pick_recipe',
           'apply_recipe', 'model_img_size']

#: fields of :class:`~epsanet.train.TrainConfig` that ``None`` leaves to the recipe
AUTO_FIELDS = ('scale', 'color_jitter', 'crop_pct', 'smoothing', 'warmup_epochs', 'sched_on_updates', 'bn_recalibrate')
#: fields of :class:`~epsanet.train.TrainConfig` that ``None`` leaves to :func:`pick_schedule`
STEP_FIELDS = ('opt', 'weight_decay', 'batch_size', 'lr', 'epochs')
#: timm's train.py batch size: the recipe's batch when the data give enough steps per epoch with it
MAX_BATCH = 128
#: smallest batch the recipe picks: BatchNorm normalises over the batch
MIN_BATCH = 8
#: smallest batch the recipe shrinks to for the step budget within given epochs (BatchNorm degrades below it)
BN_BATCH = 16
#: optimizer the recipe picks below :data:`LARGE_DATA` images, and from there on (timm's)
SMALL_DATA_OPT, LARGE_DATA_OPT = 'adamw', 'sgd'
#: (lr, global batch) the lr is scaled from: timm's --lr-base for SGD-like optimizers, Adam's default step for adaptive
LR_REFERENCES = {'sgd': (0.1, 256), 'adaptive': (1e-3, BN_BATCH)}
#: weight decay by optimizer: decoupled (AdamW, LAMB; DeiT/ConvNeXt recipes) and the others (timm's train.py)
WEIGHT_DECAYS = {'decoupled': 0.05, 'other': 2e-5}
DECOUPLED_DECAY_OPTS = ('adamw', 'lamb')  # any timm optimizer name holding one: nadamw, fusedlamb, lookahead_adamw
#: optimizer steps per epoch the recipe's batch gives; a given batch with fewer gets a warning
MIN_STEPS_PER_EPOCH = 10
#: (fewer training images than, optimizer steps in all) for a run without --epochs: the BiT-HyperRule's
STEP_BUDGETS = ((20_000, 500), (500_000, 10_000), (None, 20_000))
#: most epochs the recipe picks (timm's default)
MAX_EPOCHS = 300
#: from this many training images on, timm's ImageNet augmentation is used
LARGE_DATA = 10_000
#: input sizes up to this many px are evaluated without a centre crop
NO_CROP_MAX_SIZE = 64
SMALL_SCALE = (1.0, 1.0)  # the whole image (timm's crop falls back to it): no random crop
TIMM_SCALE = (0.08, 1.0)
TIMM_COLOR_JITTER = 0.4
SMOOTHING = 0.1
MAX_WARMUP_EPOCHS = 5
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """What the recipe looks at: the training set's size, class count and whether it is grey."""
    num_images: int
    num_classes: int
    grey: bool  # every sampled image has one channel, or three equal ones


def _is_grey(path: str) -> bool:
    with Image.open(path) as img:
        if img.mode in _GREY_MODES:
            return True
        img.draft('RGB', (64, 64))  # JPEGs decode at a reduced size: cheap
        rgb = np.asarray(img.convert('RGB').resize((32, 32)), dtype=np.int16)
    return bool(np.abs(rgb - rgb[..., :1]).max() <= 2)


def summarize(paths: Sequence[str], num_classes: int, sample: int = 32, num_images: Optional[int] = None
              ) -> DataSummary:
    """Summarise a training set from its image paths (``sample`` of them, evenly spaced, are opened).
    Sources without file paths (archives, Hugging Face and webdataset sources) give ``num_images`` and no
    paths: they are then not taken for greyscale."""
    step = max(1, len(paths) // sample)
    grey = []
    for path in list(paths)[::step][:sample]:
        try:
            grey.append(_is_grey(path))
        except UNREADABLE_ERRORS:
            continue  # the loader skips and reports unreadable images
    count = len(paths) if num_images is None else num_images
    return DataSummary(num_images=count, num_classes=num_classes, grey=bool(grey) and all(grey))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What :func:`pick_schedule` settles: the step settings, the run's length, and why (picked fields only)."""
    opt: str
    weight_decay: float
    batch_size: int
    lr: float
    epochs: int
    steps_per_epoch: int
    why: Dict[str, str]
    warning: str = ''

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _rule_batch(per_process: int, epochs: Optional[int], budget: int) -> int:
    batch = min(MAX_BATCH, per_process // MIN_STEPS_PER_EPOCH)  # enough steps per epoch
    if epochs is not None:  # and the step budget within the given epochs, down to BN_BATCH
        batch = max(min(batch, per_process * epochs // budget), min(batch, BN_BATCH))
    batch = max(MIN_BATCH, batch - batch % 2)
    return max(1, min(batch, per_process))  # a set smaller than MIN_BATCH: all of it, one step per epoch


def pick_schedule(num_images: int, world_size: int = 1, batch_size: Optional[int] = None, lr: Optional[float] = None,
                  epochs: Optional[int] = None, opt: Optional[str] = None, lr_base: Optional[float] = None,
                  lr_base_size: Optional[int] = None, lr_base_scale: str = '',
                  weight_decay: Optional[float] = None) -> Schedule:
    """Optimizer, batch size, lr and epochs for ``num_images`` training images over ``world_size`` processes, by
    the principle of the module docstring; given values (not ``None``) are kept and only explained."""
    per_process = math.ceil(num_images / world_size)
    why: Dict[str, str] = {}
    warning = ''
    over = f'{per_process} images per process' if world_size > 1 else f'{num_images} images'
    budget_limit, budget = next((limit, b) for limit, b in STEP_BUDGETS if limit is None or num_images < limit)
    if opt is None:
        small = num_images < LARGE_DATA
        opt = SMALL_DATA_OPT if small else LARGE_DATA_OPT
        why['opt'] = f'--opt {opt} ({num_images} images {"<" if small else ">="} {LARGE_DATA})'
    if weight_decay is None:
        decoupled = any(name in opt.lower() for name in DECOUPLED_DECAY_OPTS)
        weight_decay = WEIGHT_DECAYS['decoupled' if decoupled else 'other']
        source = 'decoupled, as the AdamW and LAMB recipes' if decoupled else f"timm's default for {opt}"
        why['weight_decay'] = f'weight decay {weight_decay:g} ({source})'
    rule_batch = _rule_batch(per_process, epochs, budget)
    batch = rule_batch if batch_size is None else batch_size
    steps = per_process // batch
    if batch_size is None:
        if batch == MAX_BATCH:
            why['batch_size'] = f"batch {batch} (timm's; {steps} steps per epoch over {over})"
        elif batch < _rule_batch(per_process, None, budget):  # shrunk for the budget within the given epochs
            if batch == BN_BATCH:  # the floor: the budget is not reached within the given epochs
                why['batch_size'] = (f'batch {batch} ({steps} steps per epoch over {over}: the smallest batch the '
                                     f'recipe uses; the step budget {budget} would need {math.ceil(budget / epochs)} '
                                     f'per epoch in {epochs} epoch{"s" if epochs > 1 else ""})')
            else:
                why['batch_size'] = (f'batch {batch} ({steps} steps per epoch over {over}: the step budget {budget} '
                                     f'in {epochs} epoch{"s" if epochs > 1 else ""})')
        elif steps >= MIN_STEPS_PER_EPOCH:
            why['batch_size'] = (f'batch {batch} (the largest with >= {MIN_STEPS_PER_EPOCH} steps per epoch: {steps} '
                                 f'over {over})')
        else:
            why['batch_size'] = (f'batch {batch} (the smallest the recipe uses: {steps} step{"s" if steps > 1 else ""} '
                                 f'per epoch over {over})')
    elif 0 < steps < MIN_STEPS_PER_EPOCH and batch > rule_batch:
        warning = (f'--batch-size {batch} gives {steps} optimizer step{"s" if steps > 1 else ""} per epoch over {over} '
                   f'(fewer than {MIN_STEPS_PER_EPOCH}): the lr schedule and the BatchNorm statistics get few updates. '
                   f'Try --batch-size {rule_batch}, or leave --batch-size unset.')
    if lr is None:
        adaptive = any(o in opt.lower() for o in ('ada', 'lamb'))
        scale = lr_base_scale or ('sqrt' if adaptive else 'linear')
        ref_lr, ref_batch = LR_REFERENCES['adaptive' if adaptive else 'sgd']
        ref_lr = ref_lr if lr_base is None else lr_base
        ref_batch = ref_batch if lr_base_size is None else lr_base_size
        ratio = batch * world_size / ref_batch
        lr = ref_lr * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
        why['lr'] = f'lr {lr:.3g} ({ref_lr:g} per {ref_batch} images, {scale} rule for --opt {opt})'
    if epochs is None:
        epochs = min(MAX_EPOCHS, max(1, math.ceil(budget / max(1, steps))))
        bound = f'< {budget_limit}' if budget_limit is not None else f'>= {STEP_BUDGETS[-2][0]}'
        why['epochs'] = (f'{epochs} epoch{"s" if epochs > 1 else ""} (the step budget for {bound} images: {budget}'
                         f'{f", at most {MAX_EPOCHS} epochs" if epochs == MAX_EPOCHS else ""})')
    return Schedule(opt, weight_decay, batch, lr, epochs, steps, why, warning)


def pick_recipe(data: DataSummary, img_size: int, epochs: int,
                warmup_epochs: Optional[int] = None) -> Tuple[Dict[str, Any], List[str]]:
    """Values for every field of :data:`AUTO_FIELDS` and, for each, why (short phrases).

    ``warmup_epochs``: the user's value, if any (the lr's update interval depends on it).
    """
    small = data.num_images < LARGE_DATA
    size = f'{data.num_images} images < {LARGE_DATA}' if small else f'{data.num_images} images'
    values: Dict[str, Any] = {}
    why: Dict[str, str] = {}
    values['scale'] = SMALL_SCALE if small else TIMM_SCALE
    why['scale'] = f'no random crop ({size})' if small else f'random crops of 8-100% of the image ({size})'
    if data.grey:
        values['color_jitter'], why['color_jitter'] = 0.0, 'no colour jitter (grey images)'
    elif small:
        values['color_jitter'], why['color_jitter'] = 0.0, f'no colour jitter ({size})'
    else:
        values['color_jitter'] = TIMM_COLOR_JITTER
        why['color_jitter'] = f'colour jitter {TIMM_COLOR_JITTER:g} ({size})'
    if img_size <= NO_CROP_MAX_SIZE:
        values['crop_pct'] = 1.0
        why['crop_pct'] = f'no eval centre crop ({img_size} px <= {NO_CROP_MAX_SIZE})'
    else:
        values['crop_pct'], why['crop_pct'] = None, f"the model's eval centre crop ({img_size} px)"
    if small:
        values['smoothing'], why['smoothing'] = 0.0, f'no label smoothing ({size})'
        values['warmup_epochs'], why['warmup_epochs'] = 0, f'no warm-up ({size})'
    else:
        values['smoothing'], why['smoothing'] = SMOOTHING, f'label smoothing {SMOOTHING:g}'
        warmup = min(MAX_WARMUP_EPOCHS, max(1, math.ceil(epochs / 10)))
        values['warmup_epochs'] = warmup
        why['warmup_epochs'] = f'{warmup} warm-up epoch{"s" if warmup > 1 else ""} ({epochs} epochs)'
    warmup = values['warmup_epochs'] if warmup_epochs is None else warmup_epochs
    values['sched_on_updates'] = warmup > 0
    why['sched_on_updates'] = ('lr updated every step (the warm-up ramps up instead of holding the first epoch at '
                               '--warmup-lr)' if warmup > 0 else 'lr updated every epoch')
    values['bn_recalibrate'] = small
    why['bn_recalibrate'] = ('BatchNorm statistics recomputed before each validation' if small else
                             'BatchNorm running statistics as trained')
    return values, [why[f] for f in AUTO_FIELDS]


def apply_recipe(cfg: Any, data: DataSummary, img_size: int, world_size: int = 1) -> Tuple[Any, str, str]:
    """``cfg`` with the recipe's values in the fields the user left at ``None``; one line saying what was
    picked and why, and how long the run is (empty when the user set every field); and a warning line
    (empty unless a given batch size leaves too few steps per epoch)."""
    sched = pick_schedule(data.num_images, world_size, cfg.batch_size, cfg.lr, cfg.epochs, cfg.opt, cfg.lr_base,
                          cfg.lr_base_size, cfg.lr_base_scale, cfg.weight_decay)
    values, reasons = pick_recipe(data, img_size, sched.epochs, cfg.warmup_epochs)
    values.update(opt=sched.opt, weight_decay=sched.weight_decay, batch_size=sched.batch_size, lr=sched.lr,
                  epochs=sched.epochs)
    auto = [f for f in (*STEP_FIELDS, *AUTO_FIELDS) if getattr(cfg, f) is None]
    if not auto:
        return cfg, '', sched.warning
    kind = 'grey' if data.grey else 'colour'
    picked = [sched.why[f] for f in STEP_FIELDS if f in auto]
    picked += [r for f, r in zip(AUTO_FIELDS, reasons) if f in auto]
    line = (f'recipe for {data.num_images} {kind} images, {data.num_classes} classes, {img_size} px: '
            f'{", ".join(picked)}. The run: {sched.epochs} epoch{"s" if sched.epochs > 1 else ""} x '
            f'{sched.steps_per_epoch} steps = '
            f'{sched.total_steps} optimizer steps. Set --{" --".join(f.replace("_", "-") for f in auto)} (or --config) '
            'to choose.')
    return dataclasses.replace(cfg, **{f: values[f] for f in auto}), line, sched.warning




def model_img_size(model: Union[str, Any]) -> int:
    """The input size a model (or registered model name) is evaluated at by default, e.g. 224."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model) if isinstance(model, str) else getattr(model, 'pretrained_cfg', None)
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
    return int(cfg.get('input_size', (3, 224, 224))[-1])
