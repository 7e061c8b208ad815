"""``epsanet train`` as a Python function: :func:`train`.

Everything heavy comes from timm: ``create_loader`` / ``create_transform`` (data),
``create_optimizer_v2`` (optimizers, layer-wise lr decay through the model's ``group_matcher``),
``create_scheduler_v2``, ``ModelEmaV3``, ``Mixup`` and the losses. This module wires them into a
loop with checkpoints, metrics, DDP and the error handling a user needs.
"""
import contextlib
import dataclasses
import logging
import math
import shlex
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml
from timm.data import FastCollateMixup, Mixup, create_loader
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, random_seed
from torch.nn.parallel import DistributedDataParallel

from ..app.data import data_config_for, dataset_from_config, eval_loader, verify_images
from ..app.device import DistInfo, all_reduce_max, all_reduce_sum, autocast_for, init_distributed
from ..app.errors import CheckpointError, ConfigError, NonFiniteLossError
from ..app.model import build_model, check_img_size
from ..app.outputs import RunFolder, check_not_input, check_not_inside, config_inputs
from ..data import DataError, check_same_classes
from ..optimize import optimize_for_training
from ..progress import progress
from ..weights.metadata import read_weights_metadata
from .checkpoint import (
    STATE_SUFFIX,
    WEIGHTS_SUFFIX,
    atomic_write,
    latest_state,
    load_state,
    remove_stale_temporaries,
    resolve_resume,
    save_state,
    save_weights,
)
from .config import TrainConfig
from .freeze import export_state_dict, freeze_modules
from .interrupt import GracefulStop, Interrupted, pause_point, protect_workers, signal_name
from .metrics import MetricsLog
from .precise_bn import recalibrate_bn
from .recipe import MAX_BATCH, apply_recipe, model_img_size, summarize
from .resume import (
    broadcast,
    capture_rng,
    gather,
    load_scheduler_state,
    restore_rng,
    resumable_loader,
    scheduler_state,
)
from .validate import evaluate

__all__ = ['Callback', 'TrainResult', 'train']

_logger = logging.getLogger(__name__)

STATE_FORMAT = 2  # 2: the state holds the weights and the exact position (step, per-rank generators)


class Callback:
    """Hooks into :func:`train`; override what you need. Raising ``KeyboardInterrupt`` acts like Ctrl-C (in one
    process, from ``on_step``, it saves the exact position after that step)."""

    def on_step(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """After each optimizer step (``epoch`` and ``step`` count from 0)."""

    def on_epoch_end(self, epoch: int, metrics: Dict[str, Any]) -> None:
        """After the epoch's checkpoint is written (``epoch`` counts from 0)."""


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    best_top1: Optional[float]
    best_epoch: Optional[int]  # 1-based, as in the metrics
    epochs_completed: int
    metrics: List[Dict[str, Any]]
    rank: int = 0  # under torchrun, only rank 0 wrote the files

    @property
    def weights(self) -> Path:
        """``best.safetensors`` when there was validation, else ``last.safetensors``."""
        best = self.output_dir / f'best{WEIGHTS_SUFFIX}'
        return best if best.is_file() else self.output_dir / f'last{WEIGHTS_SUFFIX}'


def _check_config(cfg: TrainConfig) -> None:
    if not cfg.data_dir:
        raise ConfigError('--data-dir is required (on the command line or in the --config file): an ImageFolder '
                          'root holding train/<class>/<image> and val/<class>/<image>.')
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size is not None and cfg.batch_size % 2:
        raise ConfigError(f'mixup/cutmix need an even --batch-size, got {cfg.batch_size}.')
    if cfg.pretrained and cfg.initial_checkpoint:
        raise ConfigError('give --pretrained or --initial-checkpoint, not both.')
    if (cfg.scale is not None and len(cfg.scale) != 2) or len(cfg.ratio) != 2:
        raise ConfigError('--scale and --ratio take two numbers each (min max).')
    check_img_size(cfg.model, cfg.img_size)
    if cfg.resume == 'auto' and not cfg.output:
        raise ConfigError('--resume auto needs --output: the run folder to look for a saved state in (and to write '
                          'to).')


class _Trainer:
    """State of one run; :func:`train` drives it."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, callbacks: Sequence[Callback],
                 model: Optional[torch.nn.Module], output: Path, stop: Optional[GracefulStop] = None):
        self.cfg, self.dist, self.callbacks, self.output = cfg, dist, list(callbacks), output
        self.stop = stop or GracefulStop(cfg.grace_period)  # not entered: signal handlers are train()'s job
        self.device = dist.device
        self.primary = dist.is_primary
        random_seed(cfg.seed, dist.rank)
        self._setup_data()
        self._pick_recipe(model)
        pause_point('setup')
        resume_files = self._find_resume()
        self.state = load_state(resume_files['state']) if resume_files else None
        if self.state:
            self._check_resume(resume_files)
        self._setup_model(model, resume_files)
        self._setup_optim()
        self._setup_loaders()
        self.started = False  # nothing is written into the run folder before the first step (see _start_output)
        self.last_good = resume_files['state'] if resume_files else None

    # ---- setup -------------------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        hint = cfg.batch_size or MAX_BATCH  # streamed (wds/) sets split their shards by it; the recipe picks later
        self.train_ds = dataset_from_config(cfg, cfg.train_split, is_training=True, mark_unreadable=False,
                                            split_flag='--train-split', batch_size=hint, seed=cfg.seed)
        self.val_ds = dataset_from_config(cfg, cfg.val_split, split_flag='--val-split',
                                          batch_size=cfg.validation_batch_size or hint) \
            if cfg.val_split else None
        if self.val_ds is not None:
            check_same_classes(self.train_ds.classes, self.val_ds.classes, self.train_ds.root, self.val_ds.root)
        if cfg.strict:
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    verify_images(ds, progress=self.primary and cfg.progress)
        self.classes = self.train_ds.classes
        self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise DataError(f'{self.train_ds.root} has {self.num_classes} class ({", ".join(map(str, self.classes))}): '
                            'a classifier learns to tell classes apart, and with one class the loss is 0 from the '
                            'start, so nothing would be learned. Add a folder of images for each other class.')
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ConfigError(f'--num-classes {cfg.num_classes} but {self.train_ds.root} has {self.num_classes} class '
                              'folders; drop --num-classes to use the folders.')
        self._log('data: %d train images, %s val images, %d classes', len(self.train_ds),
                  len(self.val_ds) if self.val_ds else 'no', self.num_classes)

    def _find_resume(self) -> Optional[Dict[str, Path]]:
        cfg = self.cfg
        if cfg.resume != 'auto':
            return resolve_resume(cfg.resume) if cfg.resume else None
        found = broadcast(latest_state(cfg.output) if self.primary else None)  # rank 0 chooses for all
        if found is None:
            self._log('--resume auto: no saved state in %s, starting a new run.', cfg.output)
            return None
        self._log('--resume auto: resuming from %s.', found)
        return resolve_resume(found)

    def _pick_recipe(self, model: Optional[torch.nn.Module]) -> None:
        """Fill the fields left at ``None`` (:data:`~epsanet.train.recipe.STEP_FIELDS`, ``AUTO_FIELDS``) from the
        data."""
        cfg = self.cfg
        img_size = cfg.img_size or model_img_size(model if model is not None else cfg.model)
        samples = getattr(self.train_ds, 'samples', None)
        if samples is not None and all(isinstance(s, (tuple, list)) and isinstance(s[0], str) for s in samples[:1]):
            summary = summarize([path for path, _ in samples], self.num_classes)
        else:  # a source without file paths (an archive, hfds/, wds/): its size only (unknown: taken as large)
            size = len(self.train_ds) if hasattr(self.train_ds, '__len__') else None
            summary = summarize([], self.num_classes, num_images=size if size is not None else 10 ** 9)
        self.cfg, line, warning = apply_recipe(cfg, summary, img_size, self.dist.world_size)
        if line:
            self._log('%s', line)
        if warning:
            self._log_warning(warning)

    def _check_resume(self, files: Dict[str, Path]) -> None:
        state, cfg = self.state, self.cfg
        if state.get('model') != cfg.model or state.get('num_classes') != self.num_classes:
            raise CheckpointError(
                f'cannot resume from {files["state"]}: it was written for {state.get("model")} with '
                f'{state.get("num_classes")} classes, this run is {cfg.model} with {self.num_classes} classes. '
                'Resume with the same --model and data, or start a new run from its weights with --initial-checkpoint '
                f'{files["weights"]}.')
        if list(state.get('classes', self.classes)) != self.classes:
            raise CheckpointError(f'cannot resume from {files["state"]}: its class names differ from the folders of '
                                  f'{self.train_ds.root}.')
        if 'model_state' not in state:  # format 1: the weights are in the .safetensors file next to it
            if not files['weights'].is_file():
                raise CheckpointError(f'cannot resume: {files["weights"]} does not exist (a resume from an older '
                                      f'{files["state"].name} needs both files).')
            meta_epoch = read_weights_metadata(files['weights']).get('epoch')
            if meta_epoch is not None and meta_epoch != state['epoch']:
                raise CheckpointError(f'{files["weights"]} (epoch {meta_epoch}) and {files["state"]} (epoch '
                                      f'{state["epoch"]}) do not belong together: the run stopped while saving. '
                                      'Resume from a folder whose two files match.')
        saved = files['state'].parent / 'args.yaml'  # the options of the run so far, rewritten once this run starts
        default = model_img_size(cfg.model)
        then = ((yaml.safe_load(saved.read_text()) or {}).get('img_size') if saved.is_file() else None) or default
        if then != (cfg.img_size or default):
            self._log_warning(f'resuming at image size {cfg.img_size or default}: the run trained at {then} so far '
                              f'(--img-size {then} resumes it as it was).')
        progress = state.get('progress')
        if progress and isinstance(self.train_ds, torch.utils.data.IterableDataset):
            raise CheckpointError(f'cannot resume {files["state"]}: it stopped part-way through epoch '
                                  f'{state["epoch"] + 1}, and streamed training data ({self.train_ds.root}) cannot '
                                  'start part-way. Resume on the data it was written for, or start a new run from the '
                                  f'last finished epoch with --initial-checkpoint {files["weights"]}.')
        if progress:  # stopped part-way through an epoch: the position only means the same with the same set-up
            then = (progress['world_size'], progress['batch_size'], progress['num_train_images'])
            now = (self.dist.world_size, cfg.batch_size, len(self.train_ds))
            if then != now:
                raise CheckpointError(
                    f'cannot resume {files["state"]} exactly: it stopped at epoch {state["epoch"] + 1}, step '
                    f'{state["step"]}, with {then[0]} processes x --batch-size {then[1]} over {then[2]} training '
                    f'images; this run has {now[0]} x {now[1]} over {now[2]}. Resume with the same processes, '
                    'batch size and data, or start a new run from the last finished epoch with --initial-checkpoint '
                    f'{files["weights"]}.')

    def _setup_model(self, model: Optional[torch.nn.Module], resume_files) -> None:
        cfg = self.cfg
        if model is None:
            kwargs = dict(drop_rate=cfg.drop)
            if cfg.drop_path is not None:
                kwargs['drop_path_rate'] = cfg.drop_path
            start_from = None if self.state else (cfg.initial_checkpoint or None)
            model = build_model(cfg.model, num_classes=self.num_classes, pretrained=cfg.pretrained and not self.state,
                                checkpoint=start_from, **kwargs)
        elif getattr(model, 'num_classes', self.num_classes) != self.num_classes:
            raise ConfigError(f'the model has {model.num_classes} classes, the data {self.num_classes}.')
        self.dropped_buffers = freeze_modules(model, cfg.freeze)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.state:
            from safetensors.torch import load_file
            weights = self.state.get('model_state') or load_file(str(resume_files['weights']))
            expected = model.state_dict().keys()
            try:
                model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f'the weights in {resume_files["weights"]} do not fit {cfg.model}: {e}') from e
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.cpu_optimize and self.device.type == 'cpu':
            optimize_for_training(model)
        if cfg.sync_bn:
            if self.device.type == 'cpu':
                raise ConfigError('--sync-bn needs GPUs: PyTorch\'s SyncBatchNorm does not run on CPU. Drop --sync-bn.')
            if self.dist.distributed:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.data_config = data_config_for(model, cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)

    def _setup_optim(self) -> None:
        cfg = self.cfg
        self.lr = cfg.lr  # given, or scaled to the batch by the recipe
        try:
            self.optimizer = create_optimizer_v2(self.model, filter_bias_and_bn=cfg.filter_bias_and_bn,
                                                 **optimizer_kwargs(cfg))
        except (ValueError, AssertionError) as e:
            raise ConfigError(f'--opt {cfg.opt}: {e}') from e
        self.autocast = autocast_for(self.device, cfg.amp, cfg.amp_dtype)
        fp16 = cfg.amp and (cfg.amp_dtype or ('float16' if self.device.type == 'cuda' else 'bfloat16')) == 'float16'
        self.scaler = NativeScaler(device=self.device.type) if fp16 else None
        if cfg.amp and not fp16 and self.device.type == 'cpu' and self.data_config['input_size'][-1] < 64:
            # measured with torch 2.14.1: bf16 grouped-conv weight gradients on a 1x1 feature map
            # (stage 4 of an input under 64 px) come back as garbage, sometimes inf/NaN
            self._log_warning(
                f'--amp (bfloat16) on CPU with {self.data_config["input_size"][-1]} px images: stage 4 is 1x1 there, '
                "where PyTorch's CPU bfloat16 grouped-conv backward returns wrong weight gradients. Train in "
                'float32 (drop --amp) or use --img-size 64 or more.')
        self.start_epoch, self.best_top1, self.best_epoch, rows = 0, None, None, []
        self.start_step, self.resume_progress = 0, None
        if self.state:
            try:
                self.optimizer.load_state_dict(self.state['optimizer'])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f'the optimizer state of {self.cfg.resume} does not fit --opt {cfg.opt} with '
                                      f'these --freeze/--layer-decay settings: {e}') from e
            if self.scaler is not None and self.state.get('scaler'):
                self.scaler.load_state_dict(self.state['scaler'])
            self.start_epoch = int(self.state['epoch'])
            self.start_step, self.resume_progress = int(self.state.get('step', 0)), self.state.get('progress')
            self.best_top1, self.best_epoch = self.state.get('best_top1'), self.state.get('best_epoch')
            rows = list(self.state.get('metrics', []))
        self.metrics_rows = rows
        self.ema = None
        if cfg.model_ema:
            self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay)
            if self.state and self.state.get('model_ema') is not None:
                ema_sd = self.state['model_ema']
                self.ema.module.load_state_dict({k: v for k, v in ema_sd.items() if k in self.ema.module.state_dict()})
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)

    def _setup_loaders(self) -> None:
        cfg, dc = self.cfg, self.data_config
        self.prefetcher = self.device.type == 'cuda' and not cfg.no_prefetcher
        collate_fn, self.mixup_fn = None, None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            args = dict(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                        switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                        num_classes=self.num_classes)
            if self.prefetcher:
                collate_fn = FastCollateMixup(**args)
            else:
                self.mixup_fn = Mixup(**args)
        self.train_loader = create_loader(
            self.train_ds, input_size=dc['input_size'], batch_size=cfg.batch_size, is_training=True,
            re_prob=cfg.reprob, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=cfg.vflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=cfg.train_interpolation,
            mean=dc['mean'], std=dc['std'], num_workers=cfg.workers, distributed=self.dist.distributed,
            collate_fn=collate_fn, pin_memory=cfg.pin_mem, device=self.device, use_prefetcher=self.prefetcher,
            persistent_workers=False)  # fresh workers each epoch, seeded per epoch: resumes repeat the same data
        self.train_loader, self.train_sampler = resumable_loader(self.train_loader, cfg.seed, self.dist.world_size,
                                                                 self.dist.rank)
        if self.train_sampler is None and cfg.checkpoint_interval:
            self._log_warning(f'--checkpoint-interval is ignored: streamed training data ({self.train_ds.root}) '
                              'resumes from epoch ends only.')
        if len(self.train_loader) == 0:
            per_rank = math.ceil(len(self.train_ds) / self.dist.world_size)
            raise DataError(f'{self.train_ds.root} has {len(self.train_ds)} images ({per_rank} per process), fewer '
                            f'than one batch of {cfg.batch_size} (training drops the last partial batch). Lower '
                            '--batch-size or add images.')
        self.val_loader = None
        if self.val_ds is not None:
            self.val_loader = eval_loader(self.val_ds, dc, cfg.validation_batch_size or cfg.batch_size, cfg.workers,
                                          self.device, self.dist.distributed, self.prefetcher, cfg.pin_mem)
        for loader in (self.train_loader, self.val_loader):  # a signal to the process group stops the run, not them
            protect_workers(loader)
        if self.mixup_fn is not None or collate_fn is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()
        self.updates_per_epoch = len(self.train_loader)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(cfg), updates_per_epoch=self.updates_per_epoch)
        if self.scheduler is not None and self.state:
            if self.state.get('scheduler'):
                load_scheduler_state(self.scheduler, self.state['scheduler'])
            if cfg.sched_on_updates:
                self.scheduler.step_update(self.start_epoch * self.updates_per_epoch + self.start_step)
            else:
                self.scheduler.step(self.start_epoch)

    def _start_output(self) -> None:
        """Called once the first step is done: only now does the run write into its folder. With --overwrite (and
        no resume) the files of the run that was there before go first, so that nothing of it is mistaken for this
        run's (a --resume auto after a crash must not find the old state)."""
        self.started = True
        if not self.primary:
            return
        out = self.output
        remove_stale_temporaries(out)  # left by a process killed while writing a checkpoint
        if self.cfg.overwrite and not self.state:
            old = [p for p in out.glob(f'*{STATE_SUFFIX}')] + [out / n for n in RUN_FILES]
            for path in old:
                path.unlink(missing_ok=True)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.cfg).items()
                  if k != 'overwrite'}  # a decision of one invocation, not a setting of the run
        text = yaml.safe_dump(values, sort_keys=False)
        atomic_write(out / 'args.yaml', lambda tmp: Path(tmp).write_text(text))

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _log(self, msg: str, *args: Any) -> None:
        if self.dist.is_primary:
            _logger.info(msg, *args)

    @property
    def bare_model(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def _weights_metadata(self, epoch: int) -> Dict[str, Any]:
        dc = self.data_config
        return dict(model=self.cfg.model, num_classes=self.num_classes, classes=self.classes, epoch=epoch,
                    img_size=dc['input_size'][-1], crop_pct=dc['crop_pct'], interpolation=dc['interpolation'],
                    mean=list(dc['mean']), std=list(dc['std']))

    def save(self, epoch: int, step: int = 0, progress: Optional[List[Dict[str, Any]]] = None,
             stopped_by: Optional[int] = None) -> Path:
        """Write the resumable state ``last.state.pth`` (and at epoch ends ``last.safetensors``).

        ``epoch`` = completed epochs, ``step`` = optimizer steps done in the next one, ``progress`` = what
        :meth:`_progress` returned at that point (needed when ``step`` > 0).
        """
        state_path = self.output / f'last{STATE_SUFFIX}'
        if not self.primary:
            return state_path
        weights = export_state_dict(self.bare_model, self.dropped_buffers)
        scheduler = scheduler_state(self.scheduler) if self.scheduler is not None else None
        state = dict(
            format=STATE_FORMAT, model=self.cfg.model, num_classes=self.num_classes, classes=self.classes, epoch=epoch,
            step=step, progress=progress, model_state=weights, optimizer=self.optimizer.state_dict(),
            scheduler=scheduler, scaler=self.scaler.state_dict() if self.scaler else None,
            model_ema=export_state_dict(self.ema.module, self.dropped_buffers) if self.ema else None,
            best_top1=self.best_top1, best_epoch=self.best_epoch, metrics=self.metrics_rows,
            stopped_by=signal_name(stopped_by) if stopped_by else None)
        if step == 0:
            save_weights(self.output / f'last{WEIGHTS_SUFFIX}', weights, self._weights_metadata(epoch))
        save_state(state_path, state)  # last: the commit point of everything written before it
        self.last_good = self.stop.last_saved = state_path
        self.saved_at = (epoch, step)
        return state_path

    def _progress(self, counters: Dict[str, float]) -> Dict[str, Any]:
        """The position inside an epoch: every process's loss sums and generator states (a collective)."""
        mine = dict(counters, rng=capture_rng(self.device))
        return dict(world_size=self.dist.world_size, batch_size=self.cfg.batch_size,
                    num_train_images=len(self.train_ds), ranks=gather(mine))

    def _continue_epoch(self):
        """Start the epoch of a run resumed part-way through it where it stopped: skip the steps done, put back
        the loss sums and generators. Returns ``(first step, loss sum, images seen, start time, skipped images)``."""
        progress, self.resume_progress = self.resume_progress, None
        mine = progress['ranks'][self.dist.rank]
        self.train_sampler.skip = self.start_step * self.cfg.batch_size
        restore_rng(mine['rng'], self.device)
        return (self.start_step, mine['loss_sum'], mine['seen'], time.perf_counter() - mine['elapsed'],
                mine['skipped'])

    def _stop_requested(self) -> int:
        """The stop signal any process received (0: none); every process gets the same answer."""
        signum = self.stop.requested() or 0
        if self.dist.distributed:
            signum = int(all_reduce_max(torch.tensor(signum, device=self.device)).item())
        return signum

    def _after_step(self) -> None:
        """Save every --checkpoint-interval steps, and stop here (saving the exact position) on a signal."""
        if not self.started:
            self._start_output()
        pause_point('step')
        epoch, steps, counters = self.boundary
        signum = self._stop_requested()
        interval = self.cfg.checkpoint_interval
        path = None
        exact = self.train_sampler is not None  # streamed data has no position inside an epoch to resume from
        if exact and (signum or (interval and (epoch * self.updates_per_epoch + steps) % interval == 0)):
            path = self.save(epoch, steps, self._progress(counters), stopped_by=signum or None)
        if signum:
            raise Interrupted(signum, state=path)

    # ---- loop --------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        if hasattr(self.train_loader.sampler, 'set_epoch'):
            self.train_loader.sampler.set_epoch(epoch)
        self.train_ds.reset_skipped()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        first_step, skipped_before, lr = 0, 0, self.optimizer.param_groups[0]['lr']
        if self.resume_progress is not None:  # the first epoch of a run resumed part-way through it
            first_step, loss_sum, seen, start, skipped_before = self._continue_epoch()
        bar = progress(self.train_loader, desc=f'epoch {epoch + 1}/{self.num_epochs}', unit='batch',
                       enabled=self.primary and cfg.progress, log_interval=cfg.log_interval)
        for step, (images, targets) in enumerate(bar, first_step):
            self.step, self.boundary = step, None
            if not self.prefetcher:
                images, targets = images.to(self.device), targets.to(self.device)
            if self.mixup_fn is not None:
                images, targets = self.mixup_fn(images, targets)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                loss = self.loss_fn(model(images), targets)
            self._check_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler(loss, self.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, parameters=params)
            else:
                loss.backward()
                if cfg.clip_grad is not None:
                    dispatch_clip_grad(params, cfg.clip_grad, mode=cfg.clip_mode)
                self.optimizer.step()
            num_updates = epoch * self.updates_per_epoch + step + 1
            if self.ema is not None:
                self.ema.update(self.bare_model, step=num_updates)
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=num_updates)
            value = loss.item()
            loss_sum += value * len(images)
            seen += len(images)
            lr = self.optimizer.param_groups[0]['lr']
            rate = seen * self.dist.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f'{value:.4f}', lr=f'{lr:.3g}', img_s=f'{rate:.1f}')
            # a consistent point: what a stop here saves
            self.boundary = (epoch, step + 1, dict(loss_sum=loss_sum, seen=seen, elapsed=time.perf_counter() - start,
                                                   skipped=self.train_ds.num_skipped + skipped_before))
            for cb in self.callbacks:
                cb.on_step(epoch, step, value, lr)
            self._after_step()
        # the position a stop during validation saves (a collective, so it is taken now, in every process)
        self.end_of_steps = (epoch, self.updates_per_epoch, self._progress(dict(
            loss_sum=loss_sum, seen=seen, elapsed=time.perf_counter() - start,
            skipped=self.train_ds.num_skipped + skipped_before)))
        totals = all_reduce_sum(torch.tensor([loss_sum, seen, self.train_ds.num_skipped + skipped_before],
                                             dtype=torch.float64, device=self.device))
        skipped = int(totals[2].item())
        if skipped:
            self._log_warning(f'{skipped} unreadable training images were skipped in epoch {epoch + 1} (their paths '
                              'are logged above); use --strict to stop on them instead.')
        return dict(train_loss=totals[0].item() / max(totals[1].item(), 1), lr=lr,
                    train_img_per_sec=seen * self.dist.world_size / (time.perf_counter() - start),
                    skipped_images=skipped)

    def _log_warning(self, msg: str) -> None:
        if self.primary:
            _logger.warning(msg)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if self.dist.distributed:
            bad = all_reduce_sum(bad)
        if bad.item() > 0:
            last = f' The last good checkpoint is {self.last_good}; resume from it with --resume.' if self.last_good \
                else ''
            amp = ' or drop --amp' if self.cfg.amp else ''
            raise NonFiniteLossError(
                f'the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: training stopped. Lower the '
                f'learning rate (now {self.optimizer.param_groups[0]["lr"]:.3g}), add --clip-grad 1.0{amp}, and check '
                f'the data.{last}', epoch + 1, step + 1)

    def validate(self) -> Dict[str, Any]:
        if self.val_loader is None:
            return {}
        pause_point('validate')
        show = self.primary and self.cfg.progress
        out = {}
        if self.cfg.bn_recalibrate:
            recalibrate_bn(self.bare_model, self.train_loader, self.device, self.autocast, self.cfg.channels_last,
                           self.dist.distributed)
        m = evaluate(self.model, self.val_loader, self.device, self.num_classes, self.autocast, self.cfg.channels_last,
                     progress=show, log_interval=self.cfg.log_interval)
        out.update(val_loss=m['loss'], val_top1=m['top1'], val_top5=m['top5'])
        if self.ema is not None:
            m = evaluate(self.ema.module, self.val_loader, self.device, self.num_classes, self.autocast,
                         self.cfg.channels_last, progress=show, desc='validate EMA', log_interval=self.cfg.log_interval)
            out.update(ema_val_loss=m['loss'], ema_val_top1=m['top1'], ema_val_top5=m['top5'])
        skipped = int(all_reduce_sum(torch.tensor(self.val_ds.num_skipped, device=self.device)).item())
        self.val_ds.reset_skipped()
        if skipped:
            self._log_warning(f'{skipped} unreadable validation images were skipped (paths logged above): the '
                              'accuracy is over the readable ones.')
        return out

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.start_epoch >= self.num_epochs:
            self._log('the resumed run already finished its %d epochs.', self.num_epochs)
        self._log('training %s for %d epochs on %s (%d process%s), lr %.3g, output %s', cfg.model, self.num_epochs,
                  self.device, self.dist.world_size, 'es' if self.dist.world_size > 1 else '', self.lr, self.output)
        completed, self.step, self.in_epoch = self.start_epoch, -1, False
        self.boundary, self.end_of_steps = None, None
        self.saved_at = (self.start_epoch, self.start_step) if self.state else None
        self.stop.deferred = True  # from here on a signal stops the run at the next step boundary
        try:
            for epoch in range(self.start_epoch, self.num_epochs):
                self.step, self.in_epoch = -1, True
                random_seed((cfg.seed + 1_000_003 * (epoch + 1)) % 2 ** 31, self.dist.rank)
                row = dict(epoch=epoch + 1, **self.train_epoch(epoch))
                with self.stop.immediate():  # validation changes no training state: a signal stops it at once
                    row.update(self.validate())
                score = row.get('ema_val_top1', row.get('val_top1'))
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1, score)
                is_best = score is not None and (self.best_top1 is None or score > self.best_top1)
                if is_best:
                    self.best_top1, self.best_epoch = score, epoch + 1
                self.metrics_rows.append(row)
                if self.primary:
                    MetricsLog(self.output, self.metrics_rows).write()
                    if is_best:
                        best = self.ema.module if self.ema is not None else self.bare_model
                        meta = dict(self._weights_metadata(epoch + 1), top1=score)
                        save_weights(self.output / f'best{WEIGHTS_SUFFIX}',
                                     export_state_dict(best, self.dropped_buffers), meta)
                    self.save(epoch + 1)  # after best.safetensors: a kill before the state is written redoes both
                    self._log('epoch %d/%d: %s', epoch + 1, self.num_epochs, _summary(row))
                completed, self.in_epoch = epoch + 1, False
                for cb in self.callbacks:
                    cb.on_epoch_end(epoch, row)
                signum = self._stop_requested()
                if signum:
                    raise Interrupted(signum, state=self.last_good)
        except KeyboardInterrupt as e:
            stopped = self._stopped(e, completed)
            if stopped is e:
                raise
            raise stopped from e
        result = TrainResult(self.output, self.best_top1, self.best_epoch, len(self.metrics_rows), self.metrics_rows,
                             self.dist.rank)
        if self.best_top1 is not None:
            self._log('best top-1 %.2f%% at epoch %d: %s', self.best_top1, self.best_epoch, result.weights)
        return result

    def _stopped(self, exc: KeyboardInterrupt, completed: int) -> Interrupted:
        """Save what a stop at this point can save exactly, say how to resume; return the exception to raise."""
        signum = getattr(exc, 'signum', int(signal.SIGINT))  # a plain KeyboardInterrupt (e.g. from a callback)
        saved = getattr(exc, 'state', None)
        target = progress = None
        exact = self.train_sampler is not None  # streamed data resumes from epoch ends only
        if exact and self.in_epoch and self.end_of_steps and self.end_of_steps[0] == completed:  # in validation
            target, progress = self.end_of_steps[:2], self.end_of_steps[2]
        elif exact and self.in_epoch and self.boundary and saved is None and not self.dist.distributed:
            target = self.boundary[:2]  # e.g. a KeyboardInterrupt from a callback
        if target is not None and self.saved_at != target:
            saved = self.save(*target, progress or self._progress(self.boundary[2]), stopped_by=signum)
        elif target is not None:
            saved = self.last_good
        err = exc if isinstance(exc, Interrupted) else Interrupted(signum)
        err.state, err.reported = saved, True
        name = signal_name(signum)
        if saved is not None and self.saved_at is not None:
            epoch, step = self.saved_at
            if step == 0:
                where = f'after epoch {epoch}'
            elif step == self.updates_per_epoch:
                where = f'after the steps of epoch {epoch + 1}, before its validation (which reruns on resume)'
            else:
                where = f'at epoch {epoch + 1}, step {step} of {self.updates_per_epoch}'
            config = shlex.quote(str(self.output / 'args.yaml'))
            cmd = f'epsanet train --config {config} --resume {shlex.quote(str(saved))}'
            if self.dist.distributed:
                cmd = f'torchrun <same options> -m {cmd}'
            message = (f'stopped by {name} {where}: {saved} holds the exact position. Resume with the same command '
                       f'plus --resume auto, or: {cmd}')
        elif self.last_good is not None:
            message = (f'stopped by {name}; the last saved state is {self.last_good}: resume with --resume auto (or '
                       f'--resume {self.last_good})')
        else:
            message = f'stopped by {name} before anything was saved: run the same command again to start over'
        if not exact and self.in_epoch:
            message += (f'. Streamed training data ({self.train_ds.root}) cannot resume part-way through an epoch: '
                        f'epoch {completed + 1} reruns from its start')
        err.args = (message,)
        self._log_warning(f'{message} (exit code {err.exit_code}).')
        return err


def _summary(row: Dict[str, Any]) -> str:
    text = f'train loss {row["train_loss"]:.4f}'
    if 'val_top1' in row:
        text += f', val top-1 {row["val_top1"]:.2f}% top-5 {row["val_top5"]:.2f}% loss {row["val_loss"]:.4f}'
    if 'ema_val_top1' in row:
        text += f', EMA val top-1 {row["ema_val_top1"]:.2f}%'
    return text


RUN_FILES = ('args.yaml', f'last{WEIGHTS_SUFFIX}', f'best{WEIGHTS_SUFFIX}', 'metrics.csv', 'metrics.json',
             'metrics.png')
"""The files a run writes into its folder (besides ``*.state.pth``); ``--overwrite`` removes an old run's."""


def _run_dir(cfg: TrainConfig) -> Path:
    """--output, else the folder of the --resume file, else a new ``output/train/<time>-<model>-<size>``."""
    if cfg.output:
        return Path(cfg.output)
    if cfg.resume and cfg.resume != 'auto':
        return resolve_resume(cfg.resume)['state'].parent
    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    return Path('output') / 'train' / f'{stamp}-{cfg.model}-{cfg.img_size or model_img_size(cfg.model)}'


def _claim(output: Path, cfg: TrainConfig) -> RunFolder:
    """Lock the run folder for this run (the output policy of :mod:`epsanet.app.outputs`): an existing run there
    is refused without --resume, with the command that resumes it."""
    check_not_input([output], config_inputs(cfg))  # e.g. --initial-checkpoint run/best.safetensors --output run
    check_not_inside([output], [cfg.data_dir])  # e.g. --output DATA/train: the run's files would join the data
    resume_command = None
    if any(output.glob(f'*{STATE_SUFFIX}')):
        config = output / 'args.yaml'
        options = f'--config {shlex.quote(str(config))}' if config.is_file() else '<same options>'
        resume_command = f'epsanet train {options} --resume {shlex.quote(str(output))}'
    return RunFolder(output, flag='--output').claim(resume=bool(cfg.resume), overwrite=cfg.overwrite,
                                                    resume_command=resume_command)


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), model: Optional[torch.nn.Module] = None) -> TrainResult:
    """Train (or fine-tune) a model on ``cfg.data_dir`` and return where the results are.

    Runs as one process, or with DDP when launched by ``torchrun`` (rank 0 logs and writes). Pass
    ``model`` to train a model you built yourself instead of ``timm.create_model(cfg.model)``.
    Raises :class:`~epsanet.data.DataError`, :class:`~epsanet.app.errors.TrainError` subclasses for
    problems with the input. SIGINT (Ctrl-C), SIGTERM and SIGUSR1 stop the run at the next step
    boundary (at once during set-up and validation), save the exact position to ``last.state.pth``
    and raise :class:`~epsanet.train.interrupt.Interrupted` (a ``KeyboardInterrupt``); see
    :mod:`epsanet.train.interrupt`.
    """
    import epsanet  # noqa: F401  (registers the models)

    _check_config(cfg)
    with GracefulStop(cfg.grace_period) as stop:
        dist = init_distributed(cfg.device, cfg.dist_backend)
        try:
            output = broadcast(_run_dir(cfg) if dist.is_primary else None)  # rank 0 names it for all
            with _claim(output, cfg) if dist.is_primary else contextlib.nullcontext():
                return _Trainer(cfg, dist, callbacks, model, output, stop).run()
        except Interrupted as e:
            if not e.reported and dist.is_primary:  # during set-up
                _logger.warning('stopped by %s during set-up, before training: nothing new was saved; run the same '
                                'command again (with --resume auto it continues from the newest saved state) '
                                '(exit code %d).', signal_name(e.signum), e.exit_code)
            raise
        finally:
            if dist.owns_group:
                torch.distributed.destroy_process_group()

