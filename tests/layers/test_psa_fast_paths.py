"""Every fast formulation of the PSA layer against the reference (``epsanet.reference``).

The layer picks, per branch and mode, a depthwise-conv formulation of its grouped convs and the
memory format its branches run in (see ``epsanet/layers/psa.py``). Whatever it picks must give
the reference's numbers: forward, input and weight gradients, train and eval, NCHW and
channels_last (whole networks: tests/models/test_epsanet.py).
"""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

from epsanet import PSA
from epsanet.layers.branch_conv import (
    CHANNELS_LAST,
    NCHW,
    _conv_forward,
    branch_conv,
    grouped_conv_as_depthwise,
    plan_branch,
    to_memory_format,
)
from epsanet.layers.fold_bn import fold_batchnorm
from epsanet.reference import ReferencePSA

TOL = dict(atol=1e-5, rtol=1e-5)
CL = torch.channels_last


def _assert_same_grads(out, ref, inputs):
    """The gradients of ``out`` and ``ref`` for one random upstream gradient agree."""
    up = torch.randn_like(ref)
    grads = torch.autograd.grad((out * up).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * up).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize('in_chs,out_chs,groups,k,stride,dilation', [
    (64, 16, 16, 9, 1, 1),  # Small stage 1, 9x9: 4 in / 1 out per group
    (64, 16, 8, 7, 1, 1),  # Small stage 1, 7x7: 8 in / 2 out per group (replicated input)
    (128, 32, 16, 9, 2, 1),  # Small stage 2 first block: stride 2
    (32, 32, 16, 7, 1, 2),  # Large stage 1 branch, dilated
    (16, 16, 4, 5, 1, 1),  # 4 out per group
    (32, 32, 16, 9, 1, 1),  # Small stage 2, 9x9: 2 in / 2 out per group
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
    out = grouped_conv_as_depthwise(x, w, groups, in_chs // groups, out_chs, k, stride, dilation)
    torch.testing.assert_close(out, ref, **TOL)
    _assert_same_grads(out, ref, [x, w])


def test_dispatch_uses_the_fast_paths_where_measured():
    """The plans of Small stage-1 and stage-3 layers (measurements: epsanet/layers/branch_conv.py)."""
    layer = PSA(64, 64)  # per group (in/out): 3x3 64/16, 5x5 16/4, 7x7 8/2, 9x9 4/1
    assert layer._depthwise == [False, False, True, True]
    assert layer._depthwise_autograd == [False, False, False, True]
    assert layer._formats == [CHANNELS_LAST, NCHW, CHANNELS_LAST, NCHW]
    stage3 = PSA(256, 256)  # 256/64, 64/16, 32/8, 16/4: oneDNN's grouped conv is fast enough
    assert not any(stage3._depthwise) and not any(stage3._depthwise_autograd)
    assert stage3._formats == [CHANNELS_LAST, CHANNELS_LAST, NCHW, NCHW]
    assert plan_branch(1, 1, 9) == (False, False, NCHW)  # already depthwise
    assert plan_branch(4, 1, 3) == (False, False, NCHW)  # small kernel
    assert plan_branch(8, 2, 9) == (True, False, CHANNELS_LAST)  # 2 outputs: autograd's own backward is slow


@pytest.mark.parametrize('as_depthwise', [False, True], ids=['grouped', 'depthwise'])
@pytest.mark.parametrize('fwd_format', [NCHW, CHANNELS_LAST], ids=['fwd-nchw', 'fwd-cl'])
@pytest.mark.parametrize('grad_mode', ['fast-backward', 'autograd', 'no-grad'])
def test_branch_conv_equals_conv2d_in_every_path(as_depthwise, fwd_format, grad_mode):
    """branch_conv's paths: CPU autograd (planned forward, the grouped conv's backward in
    channels_last), autograd through the formulation (TorchScript, other devices), no grad."""
    torch.manual_seed(0)
    groups, k, stride, dilation = 8, 7, 2, 1  # 8 in / 2 out per group
    x = torch.randn(2, 64, 13, 13, requires_grad=True)
    w = (torch.randn(16, 8, k, k) / (8 * k * k) ** 0.5).requires_grad_(True)
    ref = F.conv2d(x, w, None, stride, k // 2, dilation, groups)
    args = (w, groups, 8, 16, k, stride, dilation)
    if grad_mode == 'no-grad':
        with torch.no_grad():
            out = branch_conv(x, to_memory_format(x, fwd_format), *args, as_depthwise, False)
        torch.testing.assert_close(out, ref, **TOL)
        return
    if grad_mode == 'fast-backward':
        out = branch_conv(x, to_memory_format(x, fwd_format), *args, as_depthwise, False)
        assert type(out.grad_fn).__name__ == '_FastForwardGroupedConvBackward'
    else:  # what TorchScript and other devices run: autograd through the formulation itself
        out = _conv_forward(to_memory_format(x, fwd_format), *args, as_depthwise)
    torch.testing.assert_close(out, ref, **TOL)
    _assert_same_grads(out, ref, [x, w])


@pytest.mark.parametrize('fmt', [NCHW, CHANNELS_LAST])
def test_memory_format_switch_is_cpu_only_and_keeps_values(fmt):
    x = torch.randn(2, 8, 5, 5).to(memory_format=CL)
    y = to_memory_format(x, fmt)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    expected = {NCHW: torch.contiguous_format, CHANNELS_LAST: CL}[fmt]
    assert y.is_contiguous(memory_format=expected)
    meta = torch.empty(2, 8, 5, 5, device='meta').to(memory_format=CL)
    assert to_memory_format(meta, fmt) is meta  # other devices keep the caller's format


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


@pytest.mark.parametrize('cfg', PSA_CONFIGS)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_psa_layer_matches_reference_in_inference_mode(cfg, channels_last):
    """Without autograd the branches are concatenated straight into the caller's format."""
    ref, ours = _psa_pair(cfg)
    ref.eval()
    ours.eval()
    x = torch.randn(2, cfg['inplanes'], 14, 14)
    if channels_last:
        x = x.to(memory_format=CL)
    with torch.inference_mode():
        out, expected = ours(x), ref(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


# whole networks with every fast path: tests/models/test_epsanet.py::test_matches_reference_with_gradients


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_folded_output_affine_equals_the_layer_then_the_affine_map(channels_last):
    torch.manual_seed(0)
    layer = PSA(64, 64).eval()
    folded = PSA(64, 64).eval()
    folded.load_state_dict(layer.state_dict())
    scale, shift = torch.randn(64), torch.randn(64)
    folded.fold_output_affine(scale, shift)
    x = torch.randn(2, 64, 9, 9)
    if channels_last:
        x = x.to(memory_format=CL)
    with torch.no_grad():
        out = folded(x)
        torch.testing.assert_close(out, layer(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), **TOL)
    assert out.is_contiguous(memory_format=CL) == channels_last
    with pytest.raises(ValueError, match='already'):
        folded.fold_output_affine(scale, shift)
    with pytest.raises(ValueError, match='shape'):
        PSA(64, 64).fold_output_affine(scale[:8], shift)


def test_fold_batchnorm_folds_every_bn_also_without_affine_parameters():
    """bn2 goes into the PSA attention product, the others into their convs; BNs without weight and
    bias (``affine=False``) fold too. Same outputs."""
    torch.manual_seed(0)
    model = timm.create_model(
        'epsanet50', num_classes=10, norm_layer=lambda c, **kw: torch.nn.BatchNorm2d(c, affine=False, **kw)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match='eval'):
        fold_batchnorm(timm.create_model('epsanet50', num_classes=10))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_saving_the_output_for_backward_gives_the_same_gradients(dtype):
    """The memory saver recovers the attention gradient from the output: same numbers."""
    torch.manual_seed(0)
    plain = PSA(64, 64).to(dtype).train()
    saver = PSA(64, 64, save_output_for_backward=True).to(dtype).train()
    saver.load_state_dict(plain.state_dict())
    x = torch.randn(2, 64, 10, 10, dtype=dtype)
    up = torch.randn(2, 64, 10, 10, dtype=dtype)
    grads = [torch.autograd.grad((m(xi) * up).sum(), [xi] + list(m.parameters()))
             for m, xi in ((plain, x.clone().requires_grad_()), (saver, x.clone().requires_grad_()))]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)


def test_saving_the_output_refuses_a_later_in_place_change():
    """Documented limit: an in-place op on the output is caught by autograd, never silently wrong."""
    layer = PSA(64, 64, save_output_for_backward=True).train()
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    out = torch.relu_(layer(x))
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_memory_saver_keeps_the_returned_tensor_and_no_feature_copy(channels_last):
    """With the saver on, autograd keeps the very tensor the layer returns (which the next
    BatchNorm keeps anyway), the input, the weights and [N, C, 1, 1]-sized SE tensors: no
    other feature map, whatever memory format the branches ran in."""
    layer = PSA(64, 64, save_output_for_backward=True).train()
    x = torch.randn(2, 64, 16, 16)
    if channels_last:
        x = x.to(memory_format=CL)
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    feature_maps = {t.data_ptr() for t in saved if t.dim() == 4 and t.shape[0] == 2 and t.shape[-1] > 1}
    assert feature_maps == {x.data_ptr(), out.data_ptr()}


@pytest.mark.parametrize('x_dtype', [torch.bfloat16, torch.float32])
def test_fast_backward_under_bf16_autocast(x_dtype):
    """The custom backward runs in the forward's compute dtype and hands back gradients in the
    dtypes autocast's own casts would: the same as plain conv2d under autocast."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 13, 13).to(x_dtype).requires_grad_(True)
    w = (torch.randn(16, 8, 7, 7) / 20).requires_grad_(True)
    up = torch.randn(2, 16, 13, 13)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = branch_conv(x, to_memory_format(x, CHANNELS_LAST), w, 8, 8, 16, 7, 1, 1, True, False)
        ref = F.conv2d(x, w, None, 1, 3, 1, 8)
    assert out.dtype == ref.dtype == torch.bfloat16
    grads = torch.autograd.grad((out.float() * up).sum(), [x, w])
    ref_grads = torch.autograd.grad((ref.float() * up).sum(), [x, w])
    for g, g_ref in zip(grads, ref_grads):
        assert g.dtype == g_ref.dtype
        torch.testing.assert_close(g.float(), g_ref.float(), atol=2e-2 * g_ref.abs().max().item(), rtol=0)
