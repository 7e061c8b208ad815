"""The PSA layer against a literal, naive reading of the spec (section 1), written here."""
import pytest
import torch
import torch.nn.functional as F

from epsanet import PSA, PyramidSqueezeAttention
from epsanet.reference import ReferencePSA


def naive_psa(x: torch.Tensor, layer: PyramidSqueezeAttention) -> torch.Tensor:
    """Spec section 1, step by step, with the layer's weights and nothing clever."""
    num = len(layer.convs)
    branch_outputs = []
    for i, conv in enumerate(layer.convs):
        branch_input = torch.chunk(x, num, dim=1)[i] if layer.split_input else x
        branch_outputs.append(F.conv2d(
            branch_input, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups))

    def shared_se(feat):
        pooled = feat.mean(dim=(2, 3), keepdim=True)
        hidden = F.relu(F.conv2d(pooled, layer.se.fc1.weight, layer.se.fc1.bias))
        return torch.sigmoid(F.conv2d(hidden, layer.se.fc2.weight, layer.se.fc2.bias))

    sigmoids = [shared_se(o) for o in branch_outputs]
    # softmax over the branch axis, written out
    exps = [torch.exp(s) for s in sigmoids]
    total = exps[0]
    for e in exps[1:]:
        total = total + e
    weighted = [o * (e / total) for o, e in zip(branch_outputs, exps)]
    return torch.cat(list(reversed(weighted)), dim=1)  # branch S first, branch 1 last


CONFIGS = [
    pytest.param(dict(in_chs=64, out_chs=64), id='small-stage1'),
    pytest.param(dict(in_chs=64, out_chs=64, stride=2), id='small-stride2'),
    pytest.param(dict(in_chs=128, out_chs=128, groups=(4, 8, 16, 16), split_input=True), id='large-stage1'),
    pytest.param(dict(in_chs=128, out_chs=128, stride=2, groups=(4, 8, 16, 16), split_input=True), id='large-s2'),
    pytest.param(dict(in_chs=64, out_chs=64, dilation=2), id='dilated'),
    pytest.param(dict(in_chs=32, out_chs=64, stride=2, dilation=2), id='widen-dilated'),
    pytest.param(dict(in_chs=48, out_chs=96, kernel_sizes=(3, 5, 7), groups=(1, 2, 4)), id='3-branches'),
    pytest.param(dict(in_chs=256, out_chs=256), id='small-stage3'),
]


def _randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize('cfg', CONFIGS)
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_psa_matches_naive_spec(cfg, train):
    layer = PSA(**cfg)
    _randomize(layer)
    layer.train(train)
    x = torch.randn(2, cfg['in_chs'], 12, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn_like(naive_psa(x_ref, layer))

    out = layer(x)
    assert out.shape == upstream.shape
    grads = torch.autograd.grad((out * upstream).sum(), [x] + list(layer.parameters()))
    ref = naive_psa(x_ref, layer)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x_ref] + list(layer.parameters()))

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    names = ['input'] + [n for n, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, grads, ref_grads):
        # gradients sum many terms (here up to ~20 in size): 1e-5 of the largest, as float32 allows
        atol = 1e-5 * max(1., g_ref.abs().max().item())
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=1e-5, msg=lambda m, n=name: f'grad of {n}: {m}')


@pytest.mark.parametrize('split_input', [False, True])
def test_reference_psa_module_matches_naive_spec(split_input):
    """The package's reference network (used by model tests and the benchmark) is the spec too."""
    groups = (4, 8, 16, 16) if split_input else (1, 4, 8, 16)
    ref = ReferencePSA(128, 128, stride=2, conv_groups=groups, split_input=split_input)
    layer = PSA(128, 128, stride=2, groups=groups, split_input=split_input)
    _randomize(ref)
    state = {k.replace('conv_', 'convs.'): v for k, v in ref.state_dict().items()}
    state = {(k.replace(k.split('.')[1], str(int(k.split('.')[1]) - 1)) if k.startswith('convs.') else k): v
             for k, v in state.items()}
    layer.load_state_dict(state)
    x = torch.randn(2, 128, 10, 10)
    torch.testing.assert_close(ref(x), naive_psa(x, layer), atol=1e-5, rtol=1e-5)


def test_branch_order_is_reversed():
    """Zeroing branch 1's weights must zero the LAST quarter of the output channels."""
    layer = PSA(64, 64).eval()
    with torch.no_grad():
        layer.convs[0].weight.zero_()
    out = layer(torch.randn(1, 64, 8, 8))
    assert torch.count_nonzero(out[:, 48:]) == 0
    assert torch.count_nonzero(out[:, :16]) > 0


def test_attention_is_a_softmax_over_branches():
    """With a constant input per branch the weights of the branches sum to one per channel."""
    layer = PSA(16, 16, kernel_sizes=(1, 1, 1, 1), groups=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        for conv in layer.convs:
            conv.weight.fill_(1.0 / 16)  # every branch output == mean of the input channels
    x = torch.ones(1, 16, 4, 4)
    out = layer(x).view(1, 4, 4, 4, 4)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 4, 4, 4))


def test_psa_shapes_and_param_count():
    layer = PSA(64, 64)
    # branch i: out 16 x (in 64 / g_i) x k_i^2; SE 16 -> 1 -> 16 with biases
    branches = sum(16 * (64 // g) * k * k for k, g in ((3, 1), (5, 4), (7, 8), (9, 16)))
    expected = branches + (16 * 1 + 1) + (1 * 16 + 16)
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert layer(torch.randn(1, 64, 9, 9)).shape == (1, 64, 9, 9)
    assert PSA(64, 128, stride=2)(torch.randn(1, 64, 9, 9)).shape == (1, 128, 5, 5)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(in_chs=64, out_chs=66), 'divisible by the number of branches'),
    (dict(in_chs=66, out_chs=64, split_input=True), 'divisible by the number of branches'),
    (dict(in_chs=64, out_chs=64, groups=(1, 4, 8)), 'one group count per kernel'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(3, 4, 7, 9)), 'must be odd'),
    (dict(in_chs=64, out_chs=64, groups=(1, 4, 8, 32)), 'groups=32, which must divide'),
    (dict(in_chs=60, out_chs=64, groups=(1, 4, 8, 16)), 'groups=8, which must divide both its input channels (60)'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(), groups=()), 'at least one branch'),
    (dict(in_chs=64, out_chs=64, stride=0), 'stride and dilation'),
])
def test_invalid_configurations_raise_value_error(kwargs, needle):
    with pytest.raises(ValueError) as info:
        PSA(**kwargs)
    assert needle in str(info.value)


def test_psa_in_a_user_network_trains():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        PSA(32, 32, groups=(1, 2, 4, 8)), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
