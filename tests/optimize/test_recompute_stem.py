"""The recomputed stem: the plain model's numbers, fewer saved activations, modules still called as modules."""
import copy

import timm
import torch
import torch.nn.functional as F
from timm.models import ResNet

from epsanet.optimize.recompute_stem import StemRecomputingResNet, recompute_stem, restore_stem


def _model():
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).double()
    with torch.no_grad():
        model.bn1.running_mean.normal_(0, 0.1)
        model.bn1.weight.uniform_(0.5, 1.5)
    return model


def _saved_bytes(model, x):
    """Bytes autograd saves for the backward pass during one training forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out


def test_same_outputs_gradients_and_statistics_as_the_plain_model():
    plain = _model().train()
    fast = copy.deepcopy(plain)
    assert recompute_stem(fast) and isinstance(fast, StemRecomputingResNet) and isinstance(fast, ResNet)
    x, target = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([1, 3])
    for _ in range(2):  # two steps: the running statistics are updated once per step, as in the plain model
        for m in (plain, fast):
            m.zero_grad()
            F.cross_entropy(m(x), target).backward()
    for (k, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f'{k}: {m}')
    grads = dict(fast.named_parameters())
    for k, p in plain.named_parameters():
        torch.testing.assert_close(grads[k].grad, p.grad, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f'{k}: {m}')
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=0, rtol=0)


def test_saves_less_for_the_backward_pass():
    plain = _model().float().train()
    fast = copy.deepcopy(plain)
    recompute_stem(fast)
    x = torch.randn(2, 3, 64, 64)
    stored, _ = _saved_bytes(plain, x)
    recomputed, _ = _saved_bytes(fast, x)
    stem_maps = 2 * 64 * 32 * 32 * 4 * 2 + 2 * 64 * 16 * 16 * 8  # conv and ReLU outputs (float), pool indices
    assert stored - recomputed >= stem_maps


def test_stem_modules_are_called_as_modules():
    model = _model().float().train()
    recompute_stem(model)
    calls = []
    for name in ('conv1', 'bn1', 'act1', 'maxpool'):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    stem = ['conv1', 'bn1', 'act1', 'maxpool']
    # the forward, then the recomputation, which autograd stops once it has what the backward pass needs
    assert calls[:4] == stem and calls[4:7] == stem[:3]
    calls.clear()
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert calls == stem


def test_restore_and_non_resnet_models():
    model = _model()
    keys = list(model.state_dict())
    recompute_stem(model)
    assert list(model.state_dict()) == keys
    assert type(restore_stem(model)) is ResNet
    backbone = timm.create_model('epsanet50', features_only=True, out_indices=(1,))
    assert recompute_stem(backbone) is False and not isinstance(backbone, StemRecomputingResNet)
