"""The recomputed stem against the plain module chain: outputs, gradients, BatchNorm buffers, memory."""
import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import epsanet  # noqa: F401  (registers the models)
from epsanet.layers.recomputed_stem import recomputed_stem, supports_recomputed_stem


def _stem(bias=False, act=nn.ReLU, momentum=0.1):
    torch.manual_seed(0)
    mods = nn.ModuleList([
        nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=bias), nn.BatchNorm2d(8, momentum=momentum),
        act(inplace=True) if act is nn.ReLU else act(), nn.MaxPool2d(3, stride=2, padding=1)])
    with torch.no_grad():
        mods[1].weight.uniform_(-1.5, 1.5)  # negative scales too: the ReLU mask must still be right
        mods[1].bias.normal_(0, 0.5)
        mods[1].running_mean.normal_(0, 0.1)
        mods[1].running_var.uniform_(0.5, 1.5)
    return mods.double()


def _run(mods, x, recompute):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = recomputed_stem(x, *mods) if recompute else mods[3](mods[2](mods[1](mods[0](x))))
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * up).sum().backward()
    grads = {n: p.grad for n, p in mods.named_parameters()}
    return out, x.grad, grads, {n: b.clone() for n, b in mods.named_buffers()}


@pytest.mark.parametrize('bn_train', [True, False], ids=['batch_stats', 'frozen_bn'])
@pytest.mark.parametrize('bias,act,momentum,input_grad', [
    (False, nn.ReLU, 0.1, False),  # the EPSANet stem
    (True, nn.ReLU, None, True),  # conv bias, cumulative BN average, gradient to the input
    (False, nn.Identity, 0.1, True),
])
def test_same_outputs_gradients_and_buffers_as_the_modules(bn_train, bias, act, momentum, input_grad):
    plain = _stem(bias, act, momentum)
    plain.train()
    plain[1].train(bn_train)
    ours = copy.deepcopy(plain)
    x = torch.randn(3, 3, 30, 30, dtype=torch.float64, requires_grad=input_grad)
    for _ in range(2):  # the second step normalises with the buffers the first one updated (frozen: unchanged)
        expected, ours_result = _run(plain, x, False), _run(ours, x, True)
        torch.testing.assert_close(ours_result[0], expected[0], rtol=0, atol=1e-12)
        if input_grad:
            torch.testing.assert_close(ours_result[1], expected[1], rtol=0, atol=1e-12)
        else:
            assert ours_result[1] is None
        for n, g in expected[2].items():
            torch.testing.assert_close(ours_result[2][n], g, rtol=0, atol=1e-10, msg=lambda m, n=n: f'{n}: {m}')
        for n, b in expected[3].items():
            torch.testing.assert_close(ours_result[3][n], b, rtol=0, atol=0, msg=lambda m, n=n: f'{n}: {m}')
        plain.zero_grad()
        ours.zero_grad()


def test_float32_channels_last():
    plain = _stem().float().to(memory_format=torch.channels_last).train()
    ours = copy.deepcopy(plain)
    x = torch.randn(2, 3, 40, 40)
    expected, ours_result = _run(plain, x, False), _run(ours, x, True)
    assert ours_result[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours_result[0], expected[0])
    for n, g in expected[2].items():
        torch.testing.assert_close(ours_result[2][n], g, rtol=1e-4, atol=1e-4)


def test_keeps_only_the_input_and_weights_for_backward():
    mods = _stem().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recomputed_stem(x, *mods)
    assert any(t is x for t in saved)
    params = {p.data_ptr() for p in mods.parameters()}
    assert all(t is x or t.data_ptr() in params for t in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mods[3](mods[2](mods[1](mods[0](x))))
    assert sum(t.numel() for t in saved) > 2 * 8 * 16 * 16 * 2  # the plain chain keeps the feature maps


@pytest.mark.parametrize('bn_train', [True, False], ids=['batch_stats', 'frozen_bn'])
def test_double_backward_equals_the_modules(bn_train):
    """create_graph=True (e.g. a gradient penalty): second-order gradients as with the modules."""
    plain = _stem(bias=True).train()
    plain[1].train(bn_train)
    ours = copy.deepcopy(plain)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for mods, recompute in ((plain, False), (ours, True)):
        xi = x.detach().clone().requires_grad_(True)
        out = recomputed_stem(xi, *mods) if recompute else mods[3](mods[2](mods[1](mods[0](xi))))
        first = torch.autograd.grad(out.square().sum(), [xi, mods[0].weight], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        results.append(torch.autograd.grad(penalty, [xi, mods[0].weight, mods[1].weight]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_supported_modules():
    mods = _stem()
    assert supports_recomputed_stem(*mods)
    assert not supports_recomputed_stem(nn.Sequential(mods[0]), *mods[1:])  # e.g. timm's deep stem
    assert not supports_recomputed_stem(mods[0], mods[1], nn.GELU(), mods[3])
    assert not supports_recomputed_stem(mods[0], BatchNormAct2d(8), *mods[2:])  # a BN subclass doing more
    assert not supports_recomputed_stem(*mods[:3], nn.MaxPool2d(3, 2, 1, return_indices=True))
    assert not supports_recomputed_stem(*mods[:3], nn.AvgPool2d(3, 2, 1))


def _stem_runs_recomputed(model, x) -> bool:
    """Whether autograd kept no map of the stem conv output's shape."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    stem_map = (x.shape[0], model.bn1.num_features, x.shape[2] // 2, x.shape[3] // 2)
    return not any(tuple(t.shape) == stem_map for t in saved)


def test_epsanet_recomputes_its_stem_only_when_training_with_autograd():
    model = timm.create_model('epsanet50', num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    assert _stem_runs_recomputed(model.train(), x)
    assert not _stem_runs_recomputed(timm.create_model('epsanet50', num_classes=4, recompute_stem=False).train(), x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _stem_runs_recomputed(model, x)
    deep = timm.create_model('epsanet50', num_classes=4, stem_type='deep').train()
    assert not _stem_runs_recomputed(deep, x)
    deep(x).sum().backward()  # falls back to the modules
