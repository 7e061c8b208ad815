import http.server
import threading
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from epsanet.downstream import create_backbone, epsanet_fpn_backbone, freeze_stages, pretrained_overlay


@pytest.fixture(scope='module')
def epsanet50_weights(tmp_path_factory):
    """A timm-style EPSANet-50 state dict (10 classes) saved as safetensors."""
    torch.manual_seed(1)
    model = timm.create_model('epsanet50', num_classes=10)
    with torch.no_grad():  # non-default BN statistics so that loading them is visible
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp('weights')
    save_file(sd, folder / 'epsanet50.safetensors')
    return folder, sd


def test_pretrained_overlay_sources(tmp_path):
    f = tmp_path / 'w.safetensors'
    f.write_bytes(b'x')
    assert pretrained_overlay(f)['file'] == str(f)
    assert pretrained_overlay('https://example.com/w.pth')['url'] == 'https://example.com/w.pth'
    hub = pretrained_overlay('hf-hub:org/epsanet50')
    assert hub['hf_hub_id'] == 'org/epsanet50' and hub['source'] == 'hf-hub'
    sd = {'a': torch.zeros(1)}
    assert pretrained_overlay(sd)['state_dict'] == sd
    for overlay in (pretrained_overlay(f), hub):  # the other sources are cleared
        assert overlay['state_dict'] is None and (overlay['url'] is None)


def test_pretrained_overlay_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither an existing file'):
        pretrained_overlay(tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='hf-hub:organization/name'):
        pretrained_overlay('hf-hub:no-slash')


def _assert_loaded(backbone_module: nn.Module, sd):
    got = backbone_module.state_dict()
    for k in ('conv1.weight', 'layer1.0.conv2.convs.3.weight', 'layer4.2.conv2.se.fc2.bias',
              'layer3.5.bn2.running_var', 'layer2.0.downsample.1.weight'):
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0)


def test_fpn_backbone_loads_file_and_freezes_by_default(epsanet50_weights):
    folder, sd = epsanet50_weights
    backbone = epsanet_fpn_backbone('epsanet50', weights=folder / 'epsanet50.safetensors')
    _assert_loaded(backbone.body, sd)
    # torchvision's defaults with pretrained weights: frozen BN everywhere, 3 trainable stages
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules())
    trainable = {n.split('.')[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {'layer2', 'layer3', 'layer4'}
    assert backbone.out_channels == 256
    feats = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_fpn_backbone_loads_url(epsanet50_weights, tmp_path, monkeypatch):
    """Weights from an http URL, through a server on 127.0.0.1 and timm's/epsanet's real download code."""
    folder, sd = epsanet50_weights
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/epsanet50.safetensors'
        backbone = create_backbone('epsanet50', url, num_classes=0)
    finally:
        server.shutdown()
        server.server_close()
    _assert_loaded(backbone, sd)


def test_fpn_backbone_untrained_defaults():
    backbone = epsanet_fpn_backbone('epsanet50')
    assert all(p.requires_grad for p in backbone.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())


@pytest.mark.parametrize('trainable, expected', [
    (0, set()), (2, {'layer3', 'layer4'}), (5, {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4'})])
def test_trainable_layers(trainable, expected):
    backbone = epsanet_fpn_backbone('epsanet50', trainable_layers=trainable, frozen_bn=False)
    trainable_names = {n.split('.')[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable_names == expected
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_backbone_argument_errors():
    model = timm.create_model('epsanet50')
    with pytest.raises(ValueError, match='between 0 and 5'):
        freeze_stages(model, 6)
    with pytest.raises(ValueError, match='ResNet-family'):
        freeze_stages(nn.Conv2d(3, 3, 1), 3)
    with pytest.raises(ValueError, match='returned_layers'):
        epsanet_fpn_backbone('epsanet50', returned_layers=(0, 1))


def test_registered_weights_missing_is_a_clear_error():
    from epsanet.weights import NoPretrainedWeightsError

    with pytest.raises(NoPretrainedWeightsError, match='three ways'):
        epsanet_fpn_backbone('epsanet50', weights=True)
