"""Training options do what they say, each checked against its definition, computed independently:

* ``--model-ema``: the EMA weights equal the EMA rule applied to the raw weights' trajectory;
* ``--freeze``: the frozen modules' weights and BatchNorm statistics do not change, the others do;
* ``--layer-decay``: each parameter's lr is ``lr * decay ** (head - depth)`` (stem 0, one per block, head last);
* ``--clip-grad``: the gradient norm the optimizer steps with is the clip value;
* ``--amp``: the forward runs in bfloat16 and the weights stay float32;
* ``--channels-last``: the model gets channels-last batches;
* ``--grad-checkpointing``: the blocks run their forward twice per step (once more in the backward pass);
* ``--mixup``: the model gets ``lam * x + (1 - lam) * x.flip(0)`` and the loss ``lam * y + (1 - lam) * y.flip(0)``.

For EMA and freeze, a deliberately broken implementation makes the same check fail. All runs use a
1-block-per-stage EPSANet on 12 tiny generated images (3 steps of 4).
"""
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import Mixup

from epsanet.data import write_image_folder
from epsanet.train import Callback, TrainConfig, train
from epsanet.train import loop as train_loop
from epsanet.train.checkpoint import load_state

TINY = dict(layers=(1, 1, 1, 1), channels=(64, 64, 64, 64))
FROZEN = ('conv1', 'bn1', 'layer1')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), classes=('a', 'b', 'c'), splits={'train': 4},
                              size=64)


def _cfg(data, out, **kw):
    base = dict(data_dir=str(data), output=str(out), val_split='', img_size=32, batch_size=4, epochs=1, opt='sgd',
                lr=0.05, weight_decay=0.0, sched='cosine', warmup_epochs=0, sched_on_updates=False, workers=0, seed=0,
                scale=(1.0, 1.0), hflip=0.5, color_jitter=0.0, smoothing=0.0, crop_pct=1.0, bn_recalibrate=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _tiny():
    torch.manual_seed(0)
    return timm.create_model('epsanet50', num_classes=3, **TINY)


class Trajectory(Callback):
    """The model's state after every optimizer step."""

    def __init__(self, model):
        self.model, self.states = model, []

    def on_step(self, epoch, step, loss, lr):
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


# ---- EMA ----------------------------------------------------------------------------------------------------------

DECAY = 0.6


def _ema_run(data, out):
    model = _tiny()
    trajectory = Trajectory(model)
    train(_cfg(data, out, model_ema=True, model_ema_decay=DECAY), model=model, callbacks=[trajectory])
    return load_state(out / 'last.state.pth')['model_ema'], trajectory.states


def check_ema(ema, states, decay):
    """``ema`` equals the EMA rule over ``states``: e_1 = w_1 (timm's first update copies), then
    e_t = decay * e_(t-1) + (1 - decay) * w_t, for every float tensor (weights and BatchNorm statistics)."""
    expected = {k: v.double() for k, v in states[0].items()}
    for state in states[1:]:
        expected = {k: decay * e + (1 - decay) * state[k].double() for k, e in expected.items()}
    floats = [k for k, v in states[-1].items() if v.is_floating_point()]
    for k in floats:
        torch.testing.assert_close(ema[k].double(), expected[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f'{k}: {m}')
    assert max((ema[k] - states[-1][k]).abs().max().item() for k in floats) > 1e-4  # not just the raw weights


def test_model_ema_follows_the_ema_rule(data, tmp_path):
    ema, states = _ema_run(data, tmp_path)
    assert len(states) == 3
    check_ema(ema, states, DECAY)


def test_the_ema_check_fails_on_a_broken_ema(data, tmp_path, monkeypatch):
    class SwappedDecay(train_loop.ModelEmaV3):  # a classic bug: decay and 1 - decay swapped
        def get_decay(self, step=None):
            return 1 - super().get_decay(step)

    monkeypatch.setattr(train_loop, 'ModelEmaV3', SwappedDecay)
    ema, states = _ema_run(data, tmp_path)
    with pytest.raises(AssertionError):
        check_ema(ema, states, DECAY)


# ---- freeze -------------------------------------------------------------------------------------------------------

def _freeze_run(data, out):
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(_cfg(data, out, freeze=FROZEN), model=model)
    return start, load_file(out / 'last.safetensors')


def check_frozen(start, end, frozen):
    """Every tensor of a frozen module (weights and BatchNorm statistics) is unchanged; most others changed."""
    assert end.keys() == start.keys()
    kept = [k for k in start if k.split('.')[0] in frozen]
    changed = [k for k in kept if not torch.equal(end[k], start[k])]
    assert not changed, f'frozen tensors changed: {changed[:5]}'
    others = [k for k in start if k.split('.')[0] not in frozen and start[k].is_floating_point()]
    assert sum(not torch.equal(end[k], start[k]) for k in others) > len(others) / 2


def test_freeze_keeps_the_frozen_modules_weights(data, tmp_path):
    start, end = _freeze_run(data, tmp_path)
    check_frozen(start, end, FROZEN)


def test_the_freeze_check_fails_when_nothing_is_frozen(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_loop, 'freeze_modules', lambda model, names: {})  # --freeze ignored
    start, end = _freeze_run(data, tmp_path)
    with pytest.raises(AssertionError, match='frozen tensors changed'):
        check_frozen(start, end, FROZEN)


# ---- the other options, in one run ----------------------------------------------------------------------------------

CLIP = 1e-3
LAYER_DECAY = 0.5


class _Spy:
    """Records what the loop hands the model, the optimizer and mixup (the real objects do the work)."""

    def __init__(self, monkeypatch, model):
        self.optimizers, self.mixed, self.inputs, self.logits, self.grad_norms = [], [], [], [], []
        self.first_lrs, self.block_calls = {}, 0
        real_create = train_loop.create_optimizer_v2

        def create(model, *args, **kw):
            opt = real_create(model, *args, **kw)
            real_step = opt.step
            # the model as trained (after optimize_for_training, which may replace modules); the count is kept by
            # the block's forward itself: forward hooks do not fire when torch's checkpoint recomputes a block
            block = model.layer1[0]
            block_forward = block.forward

            def counted(*a, **k):
                self.block_calls += 1
                return block_forward(*a, **k)

            block.forward = counted

            def step(*a, **k):
                if not self.first_lrs:
                    self.first_lrs.update({id(p): g['lr'] for g in opt.param_groups for p in g['params']})
                grads = [p.grad for g in opt.param_groups for p in g['params'] if p.grad is not None]
                self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
                return real_step(*a, **k)

            opt.step = step
            self.optimizers.append(opt)
            return opt

        spy = self

        class RecordingMixup(Mixup):
            def __call__(self, x, target):
                before = (x.clone(), target.clone())
                out = super().__call__(x, target)
                spy.mixed.append((*before, out[0].clone(), out[1].clone()))
                return out

        monkeypatch.setattr(train_loop, 'create_optimizer_v2', create)
        monkeypatch.setattr(train_loop, 'Mixup', RecordingMixup)
        model.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].clone()) if m.training else None)
        model.register_forward_hook(lambda m, args, out: self.logits.append(out.detach()) if m.training else None)


@pytest.fixture(scope='module')
def options_run(data, tmp_path_factory):
    # 64 px: --amp (bfloat16) on CPU needs stage 4 larger than 1x1 (see the warning in the loop)
    monkeypatch = pytest.MonkeyPatch()
    model = _tiny()
    spy = _Spy(monkeypatch, model)
    out = tmp_path_factory.mktemp('options')
    try:
        train(_cfg(data, out, img_size=64, amp=True, channels_last=True, grad_checkpointing=True, clip_grad=CLIP,
                   layer_decay=LAYER_DECAY, mixup=0.4), model=model)
    finally:
        monkeypatch.undo()
    return model, spy, out


def _depth(name: str) -> int:
    """Stem 0, the blocks 1, 2, ... in order (one per stage here), the classifier last."""
    if name.startswith(('conv1.', 'bn1.')):
        return 0
    if name.startswith('layer'):
        return int(name[len('layer')])
    assert name.startswith('fc.'), name
    return 5


def test_layer_decay_scales_each_parameters_lr(options_run):
    model, spy, _ = options_run
    assert len(spy.optimizers) == 1
    for name, p in model.named_parameters():  # at the first step (the cosine schedule ends the epoch at 0)
        assert spy.first_lrs[id(p)] == pytest.approx(0.05 * LAYER_DECAY ** (5 - _depth(name))), name


def test_clip_grad_sets_the_gradient_norm(options_run):
    _, spy, _ = options_run
    assert len(spy.grad_norms) == 3
    assert spy.grad_norms == pytest.approx([CLIP] * 3, rel=1e-3)  # unclipped, the norms are 100x or more larger


def test_amp_runs_bfloat16_and_keeps_float32_weights(options_run):
    _, spy, out = options_run
    assert {t.dtype for t in spy.logits} == {torch.bfloat16}
    assert {v.dtype for v in load_file(out / 'last.safetensors').values() if v.is_floating_point()} == {torch.float32}


def test_channels_last_batches(options_run):
    _, spy, _ = options_run
    assert len(spy.inputs) == 3 and all(x.is_contiguous(memory_format=torch.channels_last) for x in spy.inputs)


def test_grad_checkpointing_recomputes_the_blocks(options_run):
    _, spy, _ = options_run
    assert spy.block_calls == 2 * 3  # forward, and again in the backward pass, for each of 3 steps


def test_mixup_mixes_images_and_targets_with_one_lam(options_run):
    _, spy, _ = options_run
    assert len(spy.mixed) == 3
    for (x, y, mixed_x, mixed_y), model_input in zip(spy.mixed, spy.inputs):
        onehot = torch.nn.functional.one_hot(y, 3).float()
        lam = ((mixed_y - onehot.flip(0)) / (onehot - onehot.flip(0))).nan_to_num(nan=-1).max().item()
        assert 0 < lam <= 1
        torch.testing.assert_close(mixed_y, lam * onehot + (1 - lam) * onehot.flip(0))
        torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x.flip(0))
        torch.testing.assert_close(model_input, mixed_x)  # the model trains on the mixed batch
