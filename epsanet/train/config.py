"""``TrainConfig``: every option of ``epsanet train``; flag names follow timm's train.py."""
import dataclasses
from typing import Optional, Tuple

from ..app.data import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP
from ..app.flags import Options, arg, default_workers
from ..app.outputs import overwrite_option

__all__ = ['TrainConfig']

D, M, A, OPT, S, R = 'data', 'model and weights', 'augmentation and regularisation', 'optimizer', 'schedule', 'run'


@dataclasses.dataclass
class TrainConfig(Options):
    """Options of :func:`epsanet.train.train`. Defaults are timm's train.py defaults unless noted.

    The fields of :data:`epsanet.train.recipe.STEP_FIELDS` (optimizer, weight decay, batch size, lr, epochs) and
    :data:`~epsanet.train.recipe.AUTO_FIELDS` default to ``None``: training picks them from the data
    (:mod:`epsanet.train.recipe`) and logs what it picked; any value given wins.
    """
    # data
    data_dir: str = arg('', 'ImageFolder root holding <train-split>/<class>/<image> and <val-split>/...', D)
    train_split: str = arg('train', 'name of the training subfolder', D)
    val_split: str = arg('val', 'name of the validation subfolder ("" to skip validation)', D)
    dataset: str = arg('', DATASET_HELP, D)
    class_map: str = arg('', CLASS_MAP_HELP, D)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, D)
    workers: int = arg(default_workers(4), 'data loading worker processes per process (default: 4, at most the CPUs)',
                       D, aliases=('-j',))
    strict: bool = arg(False, 'check every image before training and fail on unreadable ones (default: skip '
                              'and count them)', D)
    pin_mem: bool = arg(False, 'pin CPU memory in the data loader (faster GPU copies)', D)
    # model and weights
    model: str = arg('epsanet50', 'model name', M)
    pretrained: bool = arg(False, "start from the model's registered pretrained weights", M)
    initial_checkpoint: str = arg('', 'start from this weights file (.safetensors, timm or authors\' .pth)', M)
    num_classes: Optional[int] = arg(None, 'number of classes (default: the number of class folders)', M)
    img_size: Optional[int] = arg(None, 'input image size (default: the model\'s, 224)', M)
    crop_pct: Optional[float] = arg(None, 'evaluation centre-crop fraction (default: picked from the data; see the '
                                          '"recipe for" log line)', M)
    mean: Optional[Tuple[float, ...]] = arg(None, 'normalisation mean per channel (default: the model\'s)', M,
                                            metavar='MEAN')
    std: Optional[Tuple[float, ...]] = arg(None, 'normalisation std per channel (default: the model\'s)', M,
                                           metavar='STD')
    interpolation: str = arg('', 'evaluation resize interpolation (default: the model\'s)', M)
    drop: float = arg(0.0, 'dropout rate before the classifier', M)
    drop_path: Optional[float] = arg(None, 'stochastic depth rate', M)
    freeze: Tuple[str, ...] = arg((), 'freeze these top-level modules (e.g. conv1 bn1 layer1); "backbone" freezes '
                                      'all but the classifier: a linear probe. Frozen BatchNorm stats are fixed', M,
                                  metavar='MODULE')
    grad_checkpointing: bool = arg(False, 'recompute activations in the backward pass to save memory', M)
    channels_last: bool = arg(False, 'use the channels-last memory layout', M)
    cpu_optimize: bool = arg(True, 'on CPU, train after epsanet.optimize_for_training (less activation memory, '
                                   'channels_last weights; same numbers, same checkpoint keys)', M)
    sync_bn: bool = arg(False, 'synchronise BatchNorm statistics across GPUs (distributed runs on CUDA)', M)
    bn_recalibrate: Optional[bool] = arg(None, 'recompute BatchNorm statistics over the training images before each '
                                               'validation (default: picked from the data)', M)
    # augmentation and regularisation
    scale: Optional[Tuple[float, ...]] = arg(None, 'random-resized-crop area range (default: picked from the data)',
                                             A, metavar='PCT')
    ratio: Tuple[float, ...] = arg((3. / 4., 4. / 3.), 'random-resized-crop aspect ratio range', A, metavar='RATIO')
    hflip: float = arg(0.5, 'horizontal flip probability', A)
    vflip: float = arg(0.0, 'vertical flip probability', A)
    color_jitter: Optional[float] = arg(None, 'colour jitter factor (default: picked from the data)', A)
    aa: Optional[str] = arg(None, 'AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5', A)
    reprob: float = arg(0.0, 'random erasing probability', A)
    train_interpolation: str = arg('random', 'training resize interpolation', A)
    smoothing: Optional[float] = arg(None, 'label smoothing (default: picked from the data)', A)
    mixup: float = arg(0.0, 'mixup alpha (mixup is on when > 0)', A)
    cutmix: float = arg(0.0, 'cutmix alpha (cutmix is on when > 0)', A)
    mixup_prob: float = arg(1.0, 'probability of mixup or cutmix per batch', A)
    mixup_switch_prob: float = arg(0.5, 'probability of cutmix instead of mixup when both are on', A)
    mixup_mode: str = arg('batch', 'how to apply mixup/cutmix params', A, choices=('batch', 'pair', 'elem'))
    model_ema: bool = arg(False, 'keep an exponential moving average of the weights (validated and saved as best)', A)
    model_ema_decay: float = arg(0.9998, 'EMA decay', A)
    # optimizer
    opt: Optional[str] = arg(None, 'optimizer, any name of timm.optim.create_optimizer_v2: sgd, momentum, adamw, lamb, '
                                   '... (default: picked from the data: adamw below 10000 images, else sgd)', OPT)
    opt_eps: Optional[float] = arg(None, 'optimizer epsilon', OPT)
    opt_betas: Optional[Tuple[float, ...]] = arg(None, 'optimizer betas', OPT, metavar='BETA')
    momentum: float = arg(0.9, 'SGD momentum', OPT)
    weight_decay: Optional[float] = arg(None, 'weight decay (default: picked for the optimizer: 0.05 for AdamW and '
                                              "LAMB, timm's 2e-5 for the others)", OPT)
    clip_grad: Optional[float] = arg(None, 'clip gradients to this norm (or value, see --clip-mode)', OPT)
    clip_mode: str = arg('norm', 'gradient clipping mode', OPT, choices=('norm', 'value', 'agc'))
    filter_bias_and_bn: bool = arg(True, 'exempt biases and norm weights from weight decay (timm default; the '
                                         'authors decayed all parameters: --no-filter-bias-and-bn)', OPT)
    layer_decay: Optional[float] = arg(None, 'layer-wise lr decay (e.g. 0.75): earlier layers learn slower; uses '
                                             "the model's group_matcher", OPT)
    batch_size: Optional[int] = arg(None, 'batch size per process (default: picked from the data: timm\'s 128, or the '
                                          'largest that gives 10 optimizer steps per epoch, at least 8)', OPT,
                                    aliases=('-b',))
    validation_batch_size: Optional[int] = arg(None, 'validation batch size (default: --batch-size)', OPT)
    # schedule
    lr: Optional[float] = arg(None, 'learning rate (default: --lr-base scaled to the global batch size)', S)
    lr_base: Optional[float] = arg(None, 'lr for a global batch of --lr-base-size (default: 0.1 for SGD-like '
                                         "optimizers, timm's; 1e-3 for adaptive ones, Adam's default)", S)
    lr_base_size: Optional[int] = arg(None, 'global batch size --lr-base refers to (default: 256 for SGD-like '
                                            'optimizers, 16 for adaptive ones)', S)
    lr_base_scale: str = arg('', 'lr scaling with batch size: linear or sqrt (default: sqrt for adaptive '
                                 'optimizers, else linear)', S)
    sched: str = arg('cosine', 'lr schedule', S, choices=('cosine', 'step', 'multistep', 'plateau', 'tanh', 'poly',
                                                         'wsd', 'constant', 'none'))
    sched_on_updates: Optional[bool] = arg(None, 'update the lr every step instead of every epoch (default: every '
                                                 'step when there is a warm-up)', S)
    epochs: Optional[int] = arg(None, 'number of epochs (default: picked from the data: enough for 500 optimizer '
                                      'steps below 20000 images, 10000 below 500000, else 20000; at most 300)', S)
    decay_epochs: float = arg(90, 'epochs between lr decays (step schedule)', S)
    decay_milestones: Tuple[int, ...] = arg((90, 180, 270), 'epochs of lr decay (multistep schedule)', S,
                                            metavar='EPOCH')
    decay_rate: float = arg(0.1, 'lr decay factor', S)
    warmup_epochs: Optional[int] = arg(None, 'linear warmup epochs (default: picked from --epochs)', S)
    warmup_lr: float = arg(1e-5, 'lr at the start of warmup', S)
    warmup_prefix: bool = arg(False, 'exclude warmup from the decay schedule', S)
    min_lr: float = arg(0.0, 'lower lr bound for cyclic schedules', S)
    cooldown_epochs: int = arg(0, 'epochs at --min-lr after the schedule', S)
    patience_epochs: int = arg(10, 'plateau schedule patience', S)
    # run
    device: str = arg('', 'device (default: cuda if available, else cpu)', R)
    amp: bool = arg(False, 'mixed precision (float16 on CUDA with a loss scaler, bfloat16 on CPU)', R)
    amp_dtype: str = arg('', 'mixed precision dtype (default: float16 on CUDA, bfloat16 otherwise)', R,
                         choices=('float16', 'bfloat16'))
    output: str = arg('', 'run folder (default: output/train/<time>-<model>, or the resumed run\'s folder)', R)
    resume: str = arg('', 'resume exactly where a run stopped: a run folder or its last.state.pth; "auto": the '
                          'newest state in --output, or a new run if there is none (what a requeued job needs)', R)
    overwrite: bool = overwrite_option(R)
    checkpoint_interval: int = arg(0, 'also save the resumable state every N optimizer steps (atomically, replacing '
                                      'the previous one; 0: only at epoch ends and on a stop signal)', R)
    grace_period: float = arg(25.0, 'seconds to save and exit after SIGINT/SIGTERM/SIGUSR1; when saving takes longer, '
                                    'exit keeping the last saved state', R)
    seed: int = arg(42, 'random seed', R)
    no_prefetcher: bool = arg(False, 'disable timm\'s GPU prefetcher', R)
    dist_backend: str = arg('', 'torch.distributed backend (default: nccl on CUDA, gloo on CPU)', R)
    progress: bool = arg(True, 'show progress bars', R)
    log_interval: float = arg(30.0, 'seconds between progress lines when stderr is not a terminal (a file or pipe: '
                                    'plain lines instead of bars)', R)
