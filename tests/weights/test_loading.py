"""Loading EPSANet weights from files and URLs through ``timm.create_model``: epsanet/weights/loading.py."""
import hashlib
import logging
import socket

import pytest
import safetensors.torch
import timm
import torch

import epsanet  # noqa: F401  (registers the models)
from epsanet.weights import (
    NoPretrainedWeightsError,
    UnsafeCheckpointError,
    WeightsDownloadError,
    WeightsIntegrityError,
    create_pretrained,
    download_url,
    read_state_dict,
)


def _logits(model, image):
    with torch.no_grad():
        return model.eval()(image)


@pytest.fixture(scope='module')
def timm_sd(authors_file):
    """The authors' checkpoint as a timm EPSANet state dict."""
    model = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    return model.state_dict()


def test_no_registered_weights_says_so_and_shows_three_ways():
    with pytest.raises(NoPretrainedWeightsError) as info:
        timm.create_model('epsanet50_large', pretrained=True)
    msg = str(info.value)
    assert 'No pretrained weights for epsanet50_large' in msg
    assert 'never released' in msg
    assert 'pretrained_cfg_overlay=dict(file=' in msg
    assert 'pretrained_cfg_overlay=dict(url=' in msg
    assert 'hf-hub:' in msg


@pytest.mark.parametrize('fmt', ['safetensors', 'bin', 'training'])
def test_file_formats_give_the_reference_logits(fmt, tmp_path, timm_sd, image, reference_logits):
    sd = timm_sd
    if fmt == 'safetensors':
        path = tmp_path / 'w.safetensors'
        safetensors.torch.save_file(sd, path)
    elif fmt == 'bin':  # a safetensors file without the extension is recognised by its header
        path = tmp_path / 'weights.bin'
        safetensors.torch.save_file(sd, path)
    else:  # a training checkpoint: torch.compile'd + DDP prefixes, optimizer state, plain-data args
        path = tmp_path / 'last.pth.tar'
        torch.save({'epoch': 3, 'model': {f'_orig_mod.module.{k}': v for k, v in sd.items()},
                    'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}, 'args': {'lr': 0.1}}, path)
    model = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)
    assert 'state_dict' not in model.pretrained_cfg  # the tensors are not kept in the cfg


def test_num_classes_reinitialises_classifier_with_a_log_line(authors_file, caplog):
    ckpt = read_state_dict(authors_file)
    with caplog.at_level(logging.INFO):
        model = timm.create_model('epsanet50', pretrained=True, num_classes=7,
                                  pretrained_cfg_overlay=dict(file=str(authors_file)))
    assert model.fc.out_features == 7
    assert 'Re-initialising the classifier "fc": the checkpoint has 1000 classes, the model 7' in caplog.text
    # the backbone is the checkpoint's
    torch.testing.assert_close(model.layer4[2].conv3.weight, ckpt['layer4.2.conv3.weight'])


def test_fine_tuned_checkpoint_keeps_its_classes(tmp_path, authors_file, image):
    model = timm.create_model('epsanet50', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(authors_file)))
    path = tmp_path / 'ft.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    # no num_classes given: the class count comes from the checkpoint and its classifier is kept
    again = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert again.num_classes == 5
    torch.testing.assert_close(again.fc.weight, model.fc.weight)
    torch.testing.assert_close(_logits(again, image), _logits(model, image))


def test_in_chans_adapts_the_stem_like_timm(authors_file, image):
    ckpt = read_state_dict(authors_file)
    model = timm.create_model('epsanet50', pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(authors_file)))
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(model.conv1.weight, ckpt['conv1.weight'].sum(1, True))
    assert _logits(model, image[:, :1]).shape == (2, 1000)


def test_small_weights_into_large_list_the_mismatches(authors_file):
    with pytest.raises(ValueError) as info:
        timm.create_model('epsanet50_large', pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    msg = str(info.value)
    assert 'shape mismatches' in msg
    assert 'layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (128, 64, 1, 1)' in msg


def test_wrong_depth_lists_missing_keys(authors_file):
    with pytest.raises(ValueError) as info:
        timm.create_model('epsanet101', pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    assert 'missing keys (425)' in str(info.value) and 'layer3.10.conv1.weight' in str(info.value)


def test_malicious_pickle_is_refused_and_never_executed(tmp_path, authors_file):
    marker = tmp_path / 'pwned'

    class Payload:
        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return open, (self.path, 'w')  # unpickling would create the marker file

    sd = read_state_dict(authors_file)
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': sd, 'extra': Payload(marker)}, evil)

    with pytest.raises(UnsafeCheckpointError) as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert 'nothing from it was executed' in str(info.value)
    assert not marker.exists()

    # the payload is live: an unsafe load would have run it (this is what the loader prevents)
    witness = tmp_path / 'witness'
    torch.save({'extra': Payload(witness)}, tmp_path / 'live.pth')
    torch.load(tmp_path / 'live.pth', weights_only=False)
    assert witness.exists()


def test_truncated_local_files_give_a_clear_error(tmp_path, authors_file):
    sd = read_state_dict(authors_file)
    for name, save in (('w.safetensors', safetensors.torch.save_file), ('w.pth', torch.save)):
        path = tmp_path / name
        save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        with pytest.raises(WeightsIntegrityError, match='truncated or corrupt'):
            timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_local_file_sha256_is_checked(authors_file):
    with pytest.raises(WeightsIntegrityError, match='sha256 mismatch'):
        timm.create_model('epsanet50', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(authors_file), sha256='0' * 64))


# ------------------------------------------------------------------------------------------- URLs

@pytest.fixture
def served(file_server, timm_sd, tmp_path):
    """The weights as safetensors on the loopback server: (url, sha256, cache_dir)."""
    path = tmp_path / 'epsanet50_test.safetensors'
    safetensors.torch.save_file(timm_sd, path)
    data = path.read_bytes()
    file_server.files['/w/epsanet50_test.safetensors'] = data
    return file_server.url + '/w/epsanet50_test.safetensors', hashlib.sha256(data).hexdigest(), tmp_path / 'cache'


def _cached_files(cache_dir):
    return sorted(p.name for p in cache_dir.rglob('*') if p.is_file()) if cache_dir.exists() else []


def test_url_download_verifies_and_caches(served, file_server, image, reference_logits):
    url, sha, cache = served
    model = timm.create_model('epsanet50', pretrained=True, cache_dir=cache,
                              pretrained_cfg_overlay=dict(url=url, sha256=sha))
    torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)
    assert model.pretrained_cfg['url'] == url
    assert _cached_files(cache) == ['epsanet50_test.safetensors']
    gets = len([r for r in file_server.requests if r[0] == 'GET'])
    download_url(url, sha, cache_dir=cache)  # second time: from the cache
    assert len([r for r in file_server.requests if r[0] == 'GET']) == gets


def test_url_hash_mismatch_leaves_nothing_in_cache(served):
    url, sha, cache = served
    with pytest.raises(WeightsIntegrityError, match='sha256 mismatch'):
        create_pretrained('epsanet50', url, sha256='f' * 64, cache_dir=cache)
    assert _cached_files(cache) == []


def test_truncated_download_leaves_nothing_in_cache(served, file_server):
    url, sha, cache = served
    file_server.truncate['/w/epsanet50_test.safetensors'] = 1000
    with pytest.raises(WeightsIntegrityError, match='cut short'):
        create_pretrained('epsanet50', url, cache_dir=cache)  # no hash known: the length gives it away
    assert _cached_files(cache) == []


def test_corrupt_cached_copy_is_replaced(served, file_server, image, reference_logits):
    url, sha, cache = served
    download_url(url, sha, cache_dir=cache)
    (cached,) = [p for p in cache.rglob('*.safetensors')]
    cached.write_bytes(cached.read_bytes()[:5000])
    model = create_pretrained('epsanet50', url, sha256=sha, cache_dir=cache)
    torch.testing.assert_close(_logits(model, image), reference_logits, rtol=1e-4, atol=1e-5)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha


def test_offline_uses_the_url_cache(served, file_server, offline):
    url, sha, cache = served
    download_url(url, sha, cache_dir=cache)
    offline()
    file_server.files.clear()
    n = len(file_server.requests)
    create_pretrained('epsanet50', url, sha256=sha, cache_dir=cache)
    assert len(file_server.requests) == n  # no request at all
    with pytest.raises(WeightsDownloadError, match='Offline mode'):
        create_pretrained('epsanet50', url.replace('epsanet50_test', 'other'), cache_dir=cache)


def test_network_failure_says_what_was_tried_and_how_to_use_a_file(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/epsanet50.safetensors'
    with pytest.raises(WeightsDownloadError) as info:
        create_pretrained('epsanet50', url, cache_dir=tmp_path)
    assert url in str(info.value)
    assert 'pretrained_cfg_overlay=dict(file=' in str(info.value)
    assert _cached_files(tmp_path) == []


def test_missing_url_is_reported(served, file_server):
    url, _, cache = served
    with pytest.raises(WeightsDownloadError, match='404'):
        create_pretrained('epsanet50', url.replace('.safetensors', '-missing.safetensors'), cache_dir=cache)
