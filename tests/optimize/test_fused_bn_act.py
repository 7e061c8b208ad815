"""FusedBatchNorm2d and its C kernels against a literal float64 BatchNorm + ReLU written from the definition,
against nn.BatchNorm2d + nn.ReLU, and inside optimize_for_training; the fallbacks and the swap in and out."""
import copy
import logging
import statistics

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import epsanet
from epsanet.models import PSABottleneck
from epsanet.optimize import fused_bn_act, native
from epsanet.optimize.fused_bn_act import (
    FusedBatchNorm2d,
    FusedReLU,
    FusedResidualPSABottleneck,
    fuse_batchnorm_act,
    unfuse_batchnorm_act,
)

pytestmark = pytest.mark.skipif(native.compiler() is None, reason='no C compiler on this machine')


def test_the_kernels_build_and_load():
    assert fused_bn_act.kernels_available(), 'the batchnorm_act kernels did not build; see the log'


def _naive(x, weight, bias, eps, relu, residual=None):
    """BatchNorm in training mode as defined: per-channel batch mean and biased variance over N, H, W; then the
    residual, then the ReLU."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.clamp(y, min=0) if relu else y


def _pair(c, relu, momentum=0.1):
    torch.manual_seed(c)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return bn, FusedBatchNorm2d.from_batchnorm(copy.deepcopy(bn), relu=relu)


SHAPES = [(2, 3, 5, 7), (4, 64, 9, 9), (3, 130, 6, 5), (8, 16, 1, 1)]


@pytest.mark.parametrize('residual', [False, True], ids=['', 'residual'])
@pytest.mark.parametrize('relu', [True, False], ids=['relu', 'no_act'])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_forward_and_gradients_equal_the_naive_float64_definition(shape, relu, residual):
    bn, fused = _pair(shape[1], relu)
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_() if residual else None
    g = torch.randn(shape)
    y = fused(x, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(g)

    x64 = x.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if residual else None
    w64, b64 = bn.weight.detach().double().requires_grad_(), bn.bias.detach().double().requires_grad_()
    y64 = _naive(x64, w64, b64, bn.eps, relu, r64)
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=2e-5, rtol=1e-5)
    # where the float32 pre-activation sits within rounding of 0, the ReLU's gradient may differ: leave those out
    z64 = _naive(x64.detach(), w64.detach(), b64.detach(), bn.eps, False, None if r64 is None else r64.detach())
    keep = (z64.abs() > 1e-4) if relu else torch.ones_like(z64, dtype=torch.bool)
    assert keep.float().mean() > 0.99
    scale = x64.grad.abs().max()
    torch.testing.assert_close(x.grad.double()[keep] / scale, x64.grad[keep] / scale, atol=1e-5, rtol=0)
    if residual:
        torch.testing.assert_close(r.grad.double()[keep], r64.grad[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.weight.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused.bias.grad.double(), b64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('momentum', [0.1, None], ids=['momentum', 'cumulative'])
@pytest.mark.parametrize('relu', [True, False], ids=['relu', 'no_act'])
def test_matches_batchnorm_and_relu_modules_and_their_running_statistics(relu, momentum):
    bn, fused = _pair(32, relu, momentum)
    plain = nn.Sequential(bn, nn.ReLU()) if relu else bn
    for step in range(3):
        x = torch.randn(4, 32, 6, 6).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    assert int(fused.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(fused.running_mean, bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.running_var, bn.running_var, atol=1e-6, rtol=1e-5)


def test_results_do_not_depend_on_timing_and_little_on_the_thread_count():
    _, fused = _pair(48, relu=True)
    x = torch.randn(4, 48, 17, 13).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    runs = []
    threads = torch.get_num_threads()
    for n in (threads, threads, 1):
        torch.set_num_threads(n)
        try:
            xi = x.clone().requires_grad_()
            y = fused(xi)
            y.backward(g)
            runs.append((y.detach(), xi.grad))
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    for a, b in zip(runs[0], runs[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('case', ['eval', 'nchw', 'float64'])
def test_elsewhere_it_is_batchnorm_then_relu(case):
    bn, fused = _pair(8, relu=True)
    dtype = torch.float64 if case == 'float64' else torch.float32
    bn.to(dtype), fused.to(dtype)
    if case == 'eval':
        bn.eval(), fused.eval()
    x = torch.randn(2, 8, 5, 5, dtype=dtype)
    if case != 'nchw':
        x = x.contiguous(memory_format=torch.channels_last)
    assert not fused._fusable(x)
    torch.testing.assert_close(fused(x), F.relu(bn(x)), atol=1e-6, rtol=1e-6)


def test_one_value_per_channel_raises_as_batchnorm_does():
    _, fused = _pair(4, relu=True)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        fused(torch.randn(1, 4, 1, 1).contiguous(memory_format=torch.channels_last))


def test_it_shares_the_tensors_keeps_the_keys_and_fires_hooks():
    bn, fused = _pair(8, relu=True)
    shared = FusedBatchNorm2d.from_batchnorm(bn.eval(), relu=False)
    assert not shared.training
    for name, t in bn.state_dict(keep_vars=True).items():
        assert shared.state_dict(keep_vars=True)[name] is t
    back = unfuse_batchnorm_act(nn.Sequential(shared))[0]
    assert type(back) is nn.BatchNorm2d and not back.training
    assert all(back.state_dict(keep_vars=True)[k] is t for k, t in bn.state_dict(keep_vars=True).items())
    seen = []
    fused.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused(torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last))
    assert seen == [torch.Size([2, 8, 3, 3])]
    assert 'relu=True' in repr(fused)


def _model(name='epsanet50', dtype=torch.float32):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def test_the_swap_fuses_every_relu_that_follows_a_batchnorm_and_undoes_exactly():
    model = _model()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    types = [type(m) for m in model.modules()]
    assert fuse_batchnorm_act(model) == 53  # the stem, 3 per block (16 blocks), 4 shortcut BatchNorms
    fused = [m for m in model.modules() if isinstance(m, FusedBatchNorm2d)]
    assert sum(m.relu for m in fused) == 1 + 3 * 16
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(type(m) is FusedReLU for m in model.modules()) == 1 + 3 * 16
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 16  # the SE modules'
    assert sum(type(m) is FusedResidualPSABottleneck for m in model.modules()) == 16
    assert {k: v for k, v in model.state_dict(keep_vars=True).items()} == before
    assert fuse_batchnorm_act(model) == 0  # idempotent
    unfuse_batchnorm_act(model)
    assert [type(m) for m in model.modules()] == types


def _train_step(model, x, target):
    x = x.clone().to(next(model.parameters()).dtype).requires_grad_()
    out = model(x)
    F.cross_entropy(out, target).backward()
    grads = {k: p.grad.double() for k, p in model.named_parameters()}
    return out.detach().double(), x.grad.double(), grads, {k: v.double() for k, v in model.state_dict().items()}


def _rel_err(a, b):
    return ((a - b).abs().max() / (b.abs().max() + 1e-30)).item()


@pytest.mark.parametrize('name', ['epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large'])
def test_optimize_for_training_with_fused_batchnorm_is_as_close_to_float64_as_the_plain_float32_model(name):
    # float32 through 50 BatchNorm layers at batch 4, 64 px (4 values per channel in the last stage) differs from
    # float64 by up to 10-30% in single small gradients, the plain model too: ReLU masks flip on rounding and a
    # randomly initialised network's BatchNorms amplify it. The fused model is held to a few times the plain float32
    # model's own errors against float64 (median and worst); a wrong wiring (a ReLU lost or doubled, statistics
    # updated twice) gives errors near 1 everywhere.
    base = _model(name).train()
    torch.manual_seed(1)
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([1, 3, 0, 4])
    exact_model = copy.deepcopy(base).double()
    exact = _train_step(exact_model, x, target)
    plain = _train_step(copy.deepcopy(base), x, target)
    fast_model = epsanet.optimize_for_training(copy.deepcopy(base))
    blocks = sum(isinstance(m, PSABottleneck) for m in fast_model.modules())
    assert sum(isinstance(m, FusedBatchNorm2d) for m in fast_model.modules()) == 1 + 3 * blocks + 4
    fast = _train_step(fast_model, x, target)
    for i, what in ((0, 'logits'), (1, 'input gradient')):
        assert _rel_err(fast[i], exact[i]) <= 3 * _rel_err(plain[i], exact[i]) + 1e-6, what
    errors = {name: [_rel_err(run[2][k], g) for k, g in exact[2].items()] for name, run in (('plain', plain),
                                                                                             ('fast', fast))}
    assert statistics.median(errors['fast']) <= 3 * statistics.median(errors['plain']) + 1e-4
    assert max(errors['fast']) <= 3 * max(errors['plain']) + 1e-3, dict(zip(exact[2], errors['fast']))
    for k, v in exact[3].items():  # running statistics (the recomputed stem's too) and batch counts
        if k.endswith('num_batches_tracked'):
            assert fast[3][k] == v == 1, k
        else:
            assert (fast[3][k] - v).abs().max() <= 3 * (plain[3][k] - v).abs().max() + 1e-6, k
    with torch.no_grad():  # eval mode (running statistics): PyTorch's BatchNorm inside the fused modules
        torch.testing.assert_close(fast_model.eval()(x).double(), exact_model.eval()(x.double()), atol=1e-4, rtol=1e-4)


def test_inference_transform_of_a_training_transformed_model_folds_every_batchnorm():
    plain = _model().eval()
    trained = epsanet.optimize_for_training(copy.deepcopy(plain))
    folded = epsanet.optimize_for_inference(trained)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), atol=1e-5, rtol=1e-5)


def test_without_the_kernels_nothing_is_swapped(monkeypatch):
    monkeypatch.setattr(fused_bn_act, '_lib', None)
    monkeypatch.setattr(fused_bn_act, '_lib_loaded', True)
    model = _model()
    assert fuse_batchnorm_act(model) == 0
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())


def test_no_compiler_a_failed_build_or_the_switch_each_give_one_log_line_and_no_kernels(monkeypatch, tmp_path,
                                                                                         caplog):
    caplog.set_level(logging.INFO, logger='epsanet.optimize.native')
    monkeypatch.setenv('EPSANET_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv(native.ENV_NATIVE, '0')
    assert native._build_and_load('batchnorm_act') is None
    assert 'EPSANET_NATIVE_KERNELS=0' in caplog.text
    monkeypatch.delenv(native.ENV_NATIVE)
    monkeypatch.delenv('CC', raising=False)
    monkeypatch.setattr(native.shutil, 'which', lambda name: None)
    assert native._build_and_load('batchnorm_act') is None
    assert 'No C compiler found' in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv('EPSANET_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('CC', 'false')  # a "compiler" that always fails
    assert native._build_and_load('batchnorm_act') is None
    assert 'could not be built' in caplog.text
    assert list((tmp_path / 'kernels').glob('*')) == []  # nothing half-written left behind


def test_the_built_library_is_cached_under_a_name_that_holds_what_decides_the_code(monkeypatch, tmp_path):
    monkeypatch.setenv('EPSANET_CACHE_DIR', str(tmp_path))
    cc = native.compiler()
    path = native.library_path('batchnorm_act', cc)
    assert path.parent == tmp_path / 'kernels' and path.name.startswith('batchnorm_act-')
    assert native._build_and_load('batchnorm_act') is not None and path.is_file()
    assert native.library_path('batchnorm_act', cc) == path
    monkeypatch.setenv(native.ENV_MARCH, 'x86-64-v3')  # another ISA: another library
    assert native.flags()[1] == '-march=x86-64-v3' and native.library_path('batchnorm_act', cc) != path


def test_the_relu_after_a_fused_batchnorm_passes_its_output_through_and_rectifies_anything_else():
    _, fused = _pair(6, relu=True)
    act = FusedReLU()
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    y = fused(x)
    assert act(y) is y
    y.sub_(1.0)  # changed in place after the BatchNorm (a hook could do this): rectified again
    assert act(y).min() >= 0
    z = torch.randn(5)
    torch.testing.assert_close(act(z), F.relu(z))


def test_a_block_with_drop_path_keeps_its_own_residual_sum():
    model = timm.create_model('epsanet50', num_classes=5, drop_path_rate=0.1)
    fuse_batchnorm_act(model)
    with_drop_path = [m for m in model.modules() if isinstance(m, PSABottleneck) and m.drop_path is not None]
    assert len(with_drop_path) == 15  # timm gives the first block a drop rate of 0, so no DropPath
    assert all(type(b) is PSABottleneck and type(b.act3) is nn.ReLU for b in with_drop_path)
    assert all(b.bn1.relu and b.bn2.relu and not b.bn3.relu for b in with_drop_path)


def test_replacing_the_batchnorms_afterwards_keeps_every_relu():
    # timm's freeze (FrozenBatchNorm2d) and SyncBatchNorm conversion do not know about the fused ReLU
    from timm.utils import freeze

    plain = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain(x)
        frozen = epsanet.optimize_for_training(copy.deepcopy(plain))
        freeze(frozen)
        assert not any(isinstance(m, FusedBatchNorm2d) for m in frozen.modules())
        torch.testing.assert_close(frozen.eval()(x), expected, atol=1e-5, rtol=1e-5)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(epsanet.optimize_for_training(copy.deepcopy(plain)))
        assert not any(isinstance(m, FusedBatchNorm2d) for m in synced.modules())
        torch.testing.assert_close(synced.eval()(x), expected, atol=1e-5, rtol=1e-5)
