"""optimize_for_training / optimize_for_inference against the plain model: outputs, input and weight
gradients, BatchNorm statistics; and what they keep unchanged."""
import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F

import epsanet
from epsanet.optimize import FastPSA, TunedConv2d, is_optimized


def _model(name='epsanet50', dtype=torch.float64):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def _step(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)
    F.cross_entropy(out, target).backward()
    return out.detach(), x.grad


@pytest.mark.parametrize('name', ['epsanet50', 'epsanet50_large'])
def test_training_transform_equals_the_plain_model(name):
    plain = _model(name).train()
    fast = epsanet.optimize_for_training(copy.deepcopy(plain))
    assert is_optimized(fast) and not is_optimized(plain)
    assert sum(isinstance(m, FastPSA) for m in fast.modules()) == 16
    x, target = torch.randn(2, 3, 48, 48, dtype=torch.float64), torch.tensor([1, 3])
    out_a, gx_a = _step(plain, x, target)
    out_b, gx_b = _step(fast, x, target)
    tol = dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_b, out_a, **tol)
    torch.testing.assert_close(gx_b, gx_a, **tol)
    grads_b = dict(fast.named_parameters())
    for k, p in plain.named_parameters():
        torch.testing.assert_close(grads_b[k].grad, p.grad, **tol, msg=lambda m, k=k: f'{k}: {m}')
    for (k, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, k=k: f'{k}: {m}')  # BN running statistics
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), **tol)
        folded = epsanet.optimize_for_inference(copy.deepcopy(plain))
        torch.testing.assert_close(folded(x), plain(x), **tol)
        torch.testing.assert_close(folded(x.to(memory_format=torch.channels_last)), plain(x), **tol)


def test_float32_transforms_stay_close():
    plain = _model(dtype=torch.float32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(epsanet.optimize_for_training(copy.deepcopy(plain))(x), expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(epsanet.optimize_for_inference(copy.deepcopy(plain))(x), expected,
                                   atol=1e-5, rtol=1e-5)


def test_training_transform_keeps_every_key_and_checkpoints_move_both_ways():
    plain = _model(dtype=torch.float32)
    keys = {k: v.shape for k, v in plain.state_dict().items()}
    fast = epsanet.optimize_for_training(copy.deepcopy(plain))
    assert {k: v.shape for k, v in fast.state_dict().items()} == keys
    other = timm.create_model('epsanet50', num_classes=5)
    other.load_state_dict(fast.state_dict())  # transformed -> plain
    epsanet.optimize_for_training(other).load_state_dict(plain.state_dict())  # plain -> transformed
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)


def test_training_transform_keeps_the_mode_and_is_idempotent():
    model = epsanet.optimize_for_training(_model(dtype=torch.float32).eval())
    assert not model.training
    again = epsanet.optimize_for_training(model)
    assert sum(isinstance(m, FastPSA) for m in again.modules()) == 16


def test_inference_transform_folds_and_cannot_train():
    model = epsanet.optimize_for_inference(_model(dtype=torch.float32))
    assert not model.training
    assert all(n.endswith('.bn2') for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(isinstance(m, FastPSA) for m in model.modules())  # it pays in training only
    assert sum(isinstance(m, TunedConv2d) for m in model.modules()) == 16 * 4 and is_optimized(model)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_not_on_cpu_nothing_changes_and_one_line_says_so(caplog):
    caplog.set_level(logging.INFO, logger='epsanet.optimize.transforms')
    model = timm.create_model('epsanet50', device='meta')
    before = [type(m) for m in model.modules()]
    epsanet.optimize_for_training(model)
    assert [type(m) for m in model.modules()] == before
    epsanet.optimize_for_inference(model)
    assert [type(m) for m in model.modules()] == before and not model.training
    assert [r.getMessage() for r in caplog.records] == [
        f'{fn}: the model is on meta, not the CPU; nothing changed (these transforms are CPU-specific).'
        for fn in ('optimize_for_training', 'optimize_for_inference')]


def test_without_leaves_each_mechanism_off_and_keeps_the_numbers():
    """``without=`` (what ``epsanet benchmark --ablate`` turns off) removes exactly one mechanism each."""
    from epsanet.optimize.recompute_stem import StemRecomputingResNet
    from epsanet.optimize.transforms import MECHANISMS

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _model(dtype=torch.float32).eval()(x)
    for mechanism in MECHANISMS:
        train = epsanet.optimize_for_training(_model(dtype=torch.float32), without=(mechanism,))
        infer = epsanet.optimize_for_inference(_model(dtype=torch.float32), without=(mechanism,))
        kinds = {type(m) for m in train.modules()}
        assert (FastPSA in kinds) == (mechanism != 'fast_psa')
        assert isinstance(train, StemRecomputingResNet) == (mechanism != 'recompute_stem')
        folded = not any(isinstance(m, torch.nn.BatchNorm2d) for n, m in infer.named_modules() if n.endswith('bn1'))
        assert folded == (mechanism != 'fold_batchnorm')
        assert any(isinstance(m, TunedConv2d) for m in infer.modules()) == (mechanism != 'tuned_convs')
        with torch.no_grad():
            torch.testing.assert_close(infer(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='Unknown mechanism'):
        epsanet.optimize_for_training(_model(), without=('warp_drive',))
