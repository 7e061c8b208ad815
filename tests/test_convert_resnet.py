import pytest
import timm
import torch
import torchvision
from torch import nn

from epsanet import PyramidSqueezeAttention
from epsanet.convert_resnet import psa_convert


def test_resnet50_becomes_epsanet50():
    converted = psa_convert(timm.create_model('resnet50', num_classes=10))
    psas = [m for m in converted.modules() if isinstance(m, PyramidSqueezeAttention)]
    assert len(psas) == 16  # every bottleneck of [3, 4, 6, 3]
    reference = timm.create_model('epsanet50', num_classes=10)
    got = {k: tuple(v.shape) for k, v in converted.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # EPSANet-50 weights load into the converted model and give EPSANet-50's outputs
    converted.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), reference.eval()(x), rtol=0, atol=0)


def test_keeps_all_other_weights():
    torch.manual_seed(0)
    model = timm.create_model('resnet50', num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = psa_convert(model)
    assert converted is model
    after = converted.state_dict()
    kept = [k for k in before if '.conv2.' not in k]
    assert len(kept) == len(before) - 16
    for k in kept:
        assert torch.equal(after[k], before[k]), k
    assert not any(k in after for k in before if '.conv2.' in k)
    for i, block in enumerate(converted.layer2):  # stride 2 stays on the first block's PSA
        assert all(c.stride == ((2, 2) if i == 0 else (1, 1)) for c in block.conv2.convs)


def test_converted_model_trains():
    # resnet50's blocks, one per stage, to keep it quick; timm zero-initialises each block's last BN,
    # so the PSA layers get gradients from step 2 on
    model = psa_convert(timm.create_model('resnet50', num_classes=10, layers=(1, 1, 1, 1))).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    psa_weight = model.layer3[0].conv2.convs[2].weight
    start = psa_weight.detach().clone()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        assert out.shape == (4, 10)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert psa_weight.grad.abs().sum() > 0 and model.layer3[0].conv2.se.fc1.weight.grad.abs().sum() > 0
    assert not torch.equal(psa_weight, start)
    assert losses[-1] < losses[0], losses


def test_stages_and_large_config():
    model = timm.create_model('resnet50', num_classes=10)
    layer1_conv = model.layer1[0].conv2
    psa_convert(model, groups=(4, 8, 16, 16), split_input=True, stages=(3, 4))
    assert model.layer1[0].conv2 is layer1_conv
    psa = model.layer3[2].conv2
    assert isinstance(psa, PyramidSqueezeAttention) and psa.split_input and psa.groups == [4, 8, 16, 16]
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('name', ['resnext50_32x4d', 'seresnet50'])
def test_other_timm_bottleneck_models(name):
    model = psa_convert(timm.create_model(name, num_classes=5))
    assert all(isinstance(b.conv2, PyramidSqueezeAttention) for stage in (model.layer1, model.layer4) for b in stage)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_torchvision_resnet50():
    model = psa_convert(torchvision.models.resnet50(num_classes=5))
    assert isinstance(model.layer2[0].conv2, PyramidSqueezeAttention)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_errors():
    with pytest.raises(ValueError, match='BasicBlock'):
        psa_convert(timm.create_model('resnet18'))
    with pytest.raises(ValueError, match='already has PSA'):
        psa_convert(timm.create_model('epsanet50'))
    with pytest.raises(ValueError, match=r'layer1\.0\.conv2.*groups=32'):
        psa_convert(timm.create_model('resnet50'), groups=(1, 4, 8, 32))
