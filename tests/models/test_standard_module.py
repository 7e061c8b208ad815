"""EPSANet is a standard nn.Module: every module with parameters is called, and the tools that rely on
module calls (hooks, FLOP counters, module swaps, LoRA, pruning) see it as they see any timm model."""

import pytest
import timm
import torch
from timm.models.resnet import ResNet
from torch import nn
from torch.nn.utils import prune

import epsanet

# the 101-layer models take several seconds each: marked slow (they still run in CI)
ALL_MODELS = [pytest.param(n, marks=pytest.mark.slow) if '101' in n else n for n in epsanet.MODEL_NAMES]
PAPER_GFLOPS = {'epsanet50': 3.62, 'epsanet50_large': 4.72, 'epsanet101': 6.82, 'epsanet101_large': 8.97}


def _modules_never_called(model: nn.Module, x: torch.Tensor):
    owners = {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    called = set()
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: called.add(n)) for n, m in owners.items()]
    model(x).sum().backward() if model.training else model(x)
    for h in hooks:
        h.remove()
    return owners, sorted(set(owners) - called)


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('transform', [None, 'optimize_for_training', 'optimize_for_inference'])
def test_every_module_with_parameters_is_called(name, transform):
    model = timm.create_model(name, num_classes=4)
    assert type(model) is ResNet  # the class is timm's ResNet
    if transform:
        getattr(epsanet, transform)(model)
    x = torch.randn(2, 3, 32, 32)
    modes = [False] if transform == 'optimize_for_inference' else [True, False]
    for train in modes:
        model.train(train)
        with torch.set_grad_enabled(train):
            owners, missed = _modules_never_called(model, x)
        mode = 'train' if train else 'eval'
        assert len(owners) > 100 and not missed, f'{len(missed)} never called ({mode}): {missed}'


def test_a_hook_on_a_branch_conv_fires_in_train_and_eval():
    model = timm.create_model('epsanet50', num_classes=4)
    seen = []
    model.layer1[0].conv2.convs[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 32, 32)
    model.train()(x)
    with torch.no_grad():
        model.eval()(x)
    assert seen == [(2, 16, 8, 8)] * 2


def test_a_wrapper_module_swapped_in_for_a_branch_conv_is_honoured():
    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    psa = model.layer1[0].conv2
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        before = psa(x)
        psa.convs[0] = Twice(psa.convs[0])
        after = psa(x)
        psa.convs[0] = psa.convs[0].inner
        torch.testing.assert_close(psa(x), before)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_thop_and_ptflops_count_the_paper_cost(name):
    """Hook-based counters with their own default rules land on the paper's GFLOPs within 1% (they count
    BatchNorm as 4 ops per element where the paper counts 2); with the paper's BatchNorm rule thop gives
    exactly the paper's figure. For every variant."""
    thop = pytest.importorskip('thop')
    ptflops = pytest.importorskip('ptflops')

    def paper_bn(m, x, y):
        m.total_ops += torch.DoubleTensor([2 * y.numel()])

    paper = PAPER_GFLOPS[name]
    x = torch.randn(1, 3, 224, 224)
    model = timm.create_model(name).eval()
    macs, params = thop.profile(model, inputs=(x,), verbose=False)
    assert abs(macs / 1e9 - paper) / paper < 0.01, (name, macs)
    model = timm.create_model(name).eval()
    macs, _ = thop.profile(model, inputs=(x,), verbose=False, custom_ops={nn.BatchNorm2d: paper_bn})
    assert round(macs / 1e9, 2) == paper, (name, macs)
    model = timm.create_model(name).eval()
    macs, _ = ptflops.get_model_complexity_info(model, (3, 224, 224), as_strings=False,
                                                print_per_layer_stat=False, verbose=False)
    assert abs(macs / 1e9 - paper) / paper < 0.01, (name, macs)


def test_peft_lora_on_branch_convs_changes_the_output_and_trains():
    peft = pytest.importorskip('peft')
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    config = peft.LoraConfig(r=4, target_modules=r'.*conv2\.convs\.0', init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    adapted = [n for n, m in lora.named_modules() if n.endswith('conv2.convs.0') and hasattr(m, 'lora_A')]
    assert len(adapted) == 16  # one 3x3 branch per block
    with torch.no_grad():
        after = lora(x)
    assert (after - before).abs().max() > 1e-4
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.1)
    lora.train()
    start = [p.detach().clone() for p in trainable]
    torch.nn.functional.cross_entropy(lora(x), torch.tensor([0, 1])).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(start, trainable))


def test_pruning_a_branch_conv_takes_effect():
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=4).eval()
    conv = model.layer4[0].conv2.convs[3]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        prune.l1_unstructured(conv, 'weight', amount=1.0)  # applied by a forward pre-hook
        assert not torch.equal(model(x), before)
