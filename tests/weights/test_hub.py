"""Hub downloads with the real huggingface_hub client against a loopback Hub: epsanet/weights/loading.py."""
import hashlib

import pytest
import timm
import torch

import epsanet  # noqa: F401  (registers the models)
from epsanet.weights import WeightsDownloadError, WeightsIntegrityError, create_pretrained
from epsanet.weights.loading import download_from_hub

REPO = 'test-org/epsanet50-test'


@pytest.fixture
def hub_repo(hub_server, converted_dir):
    folder, _ = converted_dir
    hub_server.repos[REPO] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return hub_server


def _logits(model, image):
    with torch.no_grad():
        return model.eval()(image)


def test_hf_hub_id_loads_through_timm_with_config_json(hub_repo, image, reference_logits):
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)
    assert model.pretrained_cfg['hf_hub_id'] == REPO and model.pretrained_cfg['source'] == 'hf-hub'
    paths = [p for _, p in hub_repo.requests]
    assert f'/{REPO}/resolve/main/config.json' in paths and f'/{REPO}/resolve/main/model.safetensors' in paths


def test_offline_mode_uses_the_hub_cache(hub_repo, offline, image, reference_logits):
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # fills the cache
    offline()
    hub_repo.repos.clear()
    n = len(hub_repo.requests)
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    assert len(hub_repo.requests) == n
    torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)


def test_offline_without_cache_says_so(hub_repo, offline):
    offline()
    with pytest.raises(WeightsDownloadError, match='Offline mode'):
        download_from_hub(REPO)


def test_hub_sha256_mismatch_removes_the_cached_file(hub_repo, tmp_path):
    with pytest.raises(WeightsIntegrityError, match='sha256 mismatch'):
        create_pretrained('epsanet50', f'hf-hub:{REPO}', sha256='0' * 64)
    blobs = [p for p in (tmp_path / 'hub-cache').rglob('*') if p.is_file() and p.stat().st_size > 1e6]
    assert blobs == []
    good = hashlib.sha256(hub_repo.repos[REPO]['model.safetensors']).hexdigest()
    assert download_from_hub(REPO, sha256=good).name == 'model.safetensors'


def test_missing_repo_and_file_are_reported(hub_repo):
    with pytest.raises(WeightsDownloadError, match='not found'):
        download_from_hub('test-org/does-not-exist')
    with pytest.raises(WeightsDownloadError, match=r"none of the weight files \['weights.pth'\]"):
        download_from_hub(REPO, 'weights.pth')
    with pytest.raises(WeightsDownloadError, match='config.json'):
        create_pretrained('hf-hub:test-org/does-not-exist')
