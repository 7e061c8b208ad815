"""Shared fixtures of the CLI tests."""
import pytest
import timm
import torch

from epsanet.data import write_image_folder
from epsanet.train.checkpoint import save_weights


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny ImageFolder and 3-class weights in the format ``epsanet train`` writes (32 px recorded)."""
    root = tmp_path_factory.mktemp('cli')
    data = write_image_folder(root / 'data', classes=('a', 'b', 'c'), splits={'train': 1, 'val': 2})
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=3)
    out = root / 'run'
    save_weights(out / 'best.safetensors', model.state_dict(),
                 dict(model='epsanet50', num_classes=3, classes=['a', 'b', 'c'], img_size=32, crop_pct=1.0))
    return data, out
