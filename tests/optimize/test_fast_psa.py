"""FastPSA: the PSA layer with the transforms' memory saver and folded output affine map."""
import pytest
import timm
import torch

from epsanet import PSA
from epsanet.optimize import FastPSA, fold_batchnorm

CL = torch.channels_last
TOL = dict(atol=1e-5, rtol=1e-5)


def _pair(save_output=False, dtype=torch.float32):
    torch.manual_seed(0)
    plain = PSA(64, 64).to(dtype)
    return plain, FastPSA.from_psa(plain, save_output_for_backward=save_output)


def test_shares_the_submodules_and_keys():
    plain, fast = _pair()
    assert fast.convs is plain.convs and fast.se is plain.se
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert isinstance(fast, PSA)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_saving_the_output_for_backward_gives_the_same_gradients(dtype):
    """The memory saver recovers the attention gradient from the output: same numbers."""
    plain, saver = _pair(save_output=True, dtype=dtype)
    x = torch.randn(2, 64, 10, 10, dtype=dtype)
    up = torch.randn(2, 64, 10, 10, dtype=dtype)
    grads = [torch.autograd.grad((m(xi) * up).sum(), [xi] + list(plain.parameters()))
             for m, xi in ((plain, x.clone().requires_grad_()), (saver, x.clone().requires_grad_()))]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)


def test_saving_the_output_refuses_a_later_in_place_change():
    """Documented limit: an in-place op on the output is caught by autograd, never silently wrong."""
    _, layer = _pair(save_output=True)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    out = torch.relu_(layer(x))
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_memory_saver_keeps_the_returned_tensor_and_no_feature_copy(channels_last):
    """With the saver on, autograd keeps the very tensor the layer returns (which the next BatchNorm keeps
    anyway), the input, the weights and [N, C, 1, 1]-sized SE tensors: no other feature map."""
    _, layer = _pair(save_output=True)
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


def test_fold_batchnorm_folds_every_bn_also_without_affine_parameters():
    """Every BN that follows a conv folds into it (bn2, after the PSA attention, stays); BNs without weight and
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
        assert [n for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == [
            n for n, m in folded.named_modules() if n.endswith('.bn2')]
        torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match='eval'):
        fold_batchnorm(timm.create_model('epsanet50', num_classes=10))


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_memory_saver_hands_each_branch_a_dense_gradient_in_its_output_layout(channels_last):
    """Each branch conv gets its own gradient tensor, dense in the layout of its output, not a strided slice of
    the layer's gradient (the conv's backward would copy that)."""
    _, layer = _pair(save_output=True)
    x = torch.randn(2, 64, 12, 12)
    if channels_last:
        x = x.to(memory_format=CL)
    fmt = CL if channels_last else torch.contiguous_format
    grads = []
    hooks = [conv.register_full_backward_hook(lambda m, gi, go: grads.append(go[0])) for conv in layer.convs]
    layer(x.requires_grad_()).sum().backward()
    for h in hooks:
        h.remove()
    assert len(grads) == 4
    assert all(g.is_contiguous(memory_format=fmt) for g in grads)
