"""Test-session settings and fixtures shared by every test (and the subprocesses they start)."""
import os

import pytest
import timm
import torch

from epsanet.data import write_image_folder
from epsanet.train.checkpoint import save_weights


@pytest.fixture(scope='session', autouse=True)
def _autotune_cache_in_a_temp_folder(tmp_path_factory):
    """The autotuner's plans go to a folder of this test session, not the user's ~/.cache."""
    old = os.environ.get('EPSANET_CACHE_DIR')
    os.environ['EPSANET_CACHE_DIR'] = str(tmp_path_factory.mktemp('epsanet-cache'))
    yield
    if old is None:
        os.environ.pop('EPSANET_CACHE_DIR', None)
    else:
        os.environ['EPSANET_CACHE_DIR'] = old


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
