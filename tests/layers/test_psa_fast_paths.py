"""Every fast formulation of the PSA layer against the reference (``epsanet.reference``).

The layer picks, per branch and mode, a depthwise-conv formulation of its grouped convs and the
memory format its branches run in (see ``epsanet/layers/psa.py``). Whatever it picks must give
the reference's numbers: forward, input and weight gradients, train and eval, NCHW and
channels_last, all four models.
"""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import epsanet
from epsanet import PSA
from epsanet.layers.fold_bn import fold_batchnorm, optimize_for_inference
from epsanet.layers.psa import _grouped_conv_as_depthwise, _use_depthwise
from epsanet.reference import ReferencePSA, authors_checkpoint, create_reference

TOL = dict(atol=1e-5, rtol=1e-5)
CL = torch.channels_last


@pytest.mark.parametrize('in_chs,out_chs,groups,k,stride,dilation', [
    (64, 16, 16, 9, 1, 1),  # Small stage 1, 9x9: 4 in / 1 out per group
    (64, 16, 8, 7, 1, 1),  # Small stage 1, 7x7: 8 in / 2 out per group (replicated input)
    (128, 32, 16, 9, 2, 1),  # Small stage 2 first block: stride 2
    (32, 32, 16, 7, 1, 2),  # Large stage 1 branch, dilated
    (16, 16, 4, 5, 1, 1),  # 4 out per group
])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_grouped_conv_as_depthwise(in_chs, out_chs, groups, k, stride, dilation, channels_last):
    x = torch.randn(2, in_chs, 11, 11)
    if channels_last:
        x = x.to(memory_format=CL)
    x.requires_grad_(True)
    fan_in = in_chs // groups * k * k  # unit-scale outputs: the tolerance is absolute
    w = (torch.randn(out_chs, in_chs // groups, k, k) / fan_in ** 0.5).requires_grad_(True)
    pad = dilation * (k // 2)
    ref = F.conv2d(x, w, None, stride, pad, dilation, groups)
    out = _grouped_conv_as_depthwise(x, w, groups, in_chs // groups, out_chs, k, stride, dilation)
    torch.testing.assert_close(out, ref, **TOL)
    up = torch.randn_like(ref)
    g = torch.autograd.grad((out * up).sum(), [x, w])
    g_ref = torch.autograd.grad((ref * up).sum(), [x, w])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_dispatch_uses_the_fast_paths_where_measured():
    """Small stage 1: 7x7 (8/2 per group) and 9x9 (4/1) run depthwise in eval, only 9x9 in training."""
    layer = PSA(64, 64)
    assert layer._depthwise_eval == [False, False, True, True]
    assert layer._depthwise_train == [False, False, False, True]
    assert layer._train_channels_last
    stage3 = PSA(256, 256)  # 16+ channels per group everywhere: oneDNN's grouped conv is fast
    assert not any(stage3._depthwise_eval) and not any(stage3._depthwise_train)
    assert not stage3._train_channels_last
    assert not _use_depthwise(1, 1, 9, training=False)  # already depthwise
    assert not _use_depthwise(4, 1, 3, training=False)  # small kernel


PSA_CONFIGS = [
    pytest.param(dict(inplanes=64, planes=64), id='small-stage1'),
    pytest.param(dict(inplanes=128, planes=128, stride=2), id='small-stage2-s2'),
    pytest.param(dict(inplanes=128, planes=128, conv_groups=(4, 8, 16, 16), split_input=True), id='large-stage1'),
    pytest.param(dict(inplanes=64, planes=64, dilation=2), id='small-dilated'),
]


def _psa_pair(cfg):
    ref = ReferencePSA(**cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ours = PSA(cfg['inplanes'], cfg['planes'], stride=cfg.get('stride', 1), dilation=cfg.get('dilation', 1),
               groups=cfg.get('conv_groups', (1, 4, 8, 16)), split_input=cfg.get('split_input', False))
    state = {re.sub(r'conv_(\d)', lambda m: f'convs.{int(m.group(1)) - 1}', k): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    return ref, ours


@pytest.mark.parametrize('cfg', PSA_CONFIGS)
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_psa_layer_matches_reference(cfg, train, channels_last):
    ref, ours = _psa_pair(cfg)
    ref.train(train)
    ours.train(train)
    x = torch.randn(2, cfg['inplanes'], 14, 14)
    if channels_last:
        x = x.to(memory_format=CL)
        ours.to(memory_format=CL)
        ref.to(memory_format=CL)
    x_ref = x.detach().clone().requires_grad_(True)
    x = x.requires_grad_(True)
    out, expected = ours(x), ref(x_ref)
    torch.testing.assert_close(out, expected, **TOL)
    # the output comes back in the caller's memory format
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    up = torch.randn_like(expected)
    grads = torch.autograd.grad((out * up).sum(), [x] + list(ours.parameters()))
    ref_grads = torch.autograd.grad((expected * up).sum(), [x_ref] + list(ref.parameters()))
    names = ['input'] + [n for n, _ in ours.named_parameters()]
    for name, g, g_ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m, n=name: f'grad of {n}: {m}')


MODELS = [pytest.param(n, marks=pytest.mark.slow) for n in epsanet.MODEL_NAMES]  # 5-20 s each


def _model_pair(name):
    ref = create_reference(name, num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = timm.create_model(name, num_classes=10)
    ours.load_state_dict(epsanet.checkpoint_filter_fn(authors_checkpoint(ref), ours))
    return ref, ours


def _ours_name(ref_name):
    return re.sub(r'conv2\.conv_(\d+)', lambda m: f'conv2.convs.{int(m.group(1)) - 1}', ref_name)


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_models_match_reference_with_gradients(name, train):
    """Whole networks, forward and all gradients, against the reference within 1e-5.

    Eval runs in float32 at 32 px. Training runs in float64 at 64 px: with batch 2, train-mode
    BatchNorm normalises over 8 values per channel in the last stage and multiplies float32
    rounding ~100x, so any reordering of a conv's sums (which every fast path is) moves fp32
    logits by ~1e-4 (at 32 px, 2 values per channel: the gradients are ill-conditioned even in
    float64). float64 checks the same code paths; the PSA-layer tests above check their float32
    numerics in both modes.
    """
    dtype, size = (torch.float64, 64) if train else (torch.float32, 32)
    ref, ours = _model_pair(name)
    ref, ours = ref.to(dtype), ours.to(dtype)
    psas = [m for m in ours.modules() if isinstance(m, PSA)]
    fast = [(m._train_channels_last or any(m._depthwise_train)) if train else any(m._depthwise_eval) for m in psas]
    assert any(fast)  # a fast path is in use
    ref.train(train)
    ours.train(train)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    out, expected = ours(x), ref(x_ref)
    torch.testing.assert_close(out, expected, **TOL)
    target = torch.tensor([1, 7])
    F.cross_entropy(out, target).backward()
    F.cross_entropy(expected, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    params = dict(ours.named_parameters())
    for k, p in ref.named_parameters():
        torch.testing.assert_close(params[_ours_name(k)].grad, p.grad, **TOL, msg=lambda m, k=k: f'{k}: {m}')
    if not train:  # the one-line inference setting keeps the numbers
        fast = optimize_for_inference(ours)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) and m is not blk.bn2
                       for blk in fast.modules() if isinstance(blk, epsanet.PSABottleneck) for m in blk.children())
        with torch.no_grad():
            x = x.detach()
            torch.testing.assert_close(fast(x), expected.detach(), **TOL)
            torch.testing.assert_close(fast(x.to(memory_format=CL)), expected.detach(), **TOL)


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match='eval'):
        fold_batchnorm(timm.create_model('epsanet50', num_classes=10))
