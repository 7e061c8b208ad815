import pytest
import torch
from torch import nn
from torchvision.models.segmentation import DeepLabV3
from torchvision.ops.misc import FrozenBatchNorm2d

from epsanet.downstream import deeplabv3_epsanet


@pytest.mark.parametrize('output_stride', [8, 16])
def test_deeplabv3_output_stride(output_stride):
    model = deeplabv3_epsanet('epsanet50', num_classes=5, output_stride=output_stride, aux_loss=True).eval()
    assert isinstance(model, DeepLabV3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    side = 32 // output_stride
    assert feats['out'].shape == (2, 2048, side, side)
    assert feats['aux'].shape == (2, 1024, side, side)  # layer3: stride 16, or 8 when dilated
    assert out['out'].shape == (2, 5, 32, 32) and out['aux'].shape == (2, 5, 32, 32)
    # the PSA branch convs of layer4 are dilated instead of strided
    layer4 = [m for m in model.backbone.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert all(m.stride == (1, 1) for m in layer4)
    assert max(m.dilation[0] for m in layer4) == 32 // output_stride


def test_deeplabv3_train_step_and_frozen_bn():
    model = deeplabv3_epsanet('epsanet50', num_classes=3, output_stride=16, frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    out = model.train()(x)
    assert set(out) == {'out'}
    loss = nn.functional.cross_entropy(out['out'], y)
    loss.backward()
    assert model.backbone.layer1[0].conv2.convs[0].weight.grad.abs().sum() > 0


def test_deeplabv3_bad_output_stride():
    with pytest.raises(ValueError, match='output_stride 8 or 16'):
        deeplabv3_epsanet('epsanet50', output_stride=32)
