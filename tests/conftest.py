"""Test-session settings and fixtures shared by every test (and the subprocesses they start)."""
import os

import pytest
import timm
import torch

from epsanet import _compat
from epsanet.data import write_image_folder
from epsanet.train.checkpoint import save_weights

# `make test-floor` runs these (pytest -m floor) in a venv holding every dependency at its pyproject floor:
# every model forward/backward against the reference, features_only, the authors' checkpoint, one `epsanet
# train` epoch, predict, validate, extract, ONNX export checked by onnxruntime, the optimize transforms.
# Node id prefixes, kept in this one place; a listed file that no longer exists is an error, not a silent skip.
FLOOR_TESTS = (
    'tests/test_compat.py',
    'tests/models/test_epsanet.py::test_matches_reference_with_gradients[plain-eval-',  # all four models
    'tests/models/test_epsanet.py::test_matches_reference_with_gradients[optimize_for_training-eval-',
    'tests/models/test_epsanet.py::test_matches_reference_with_gradients[plain-train-epsanet50]',
    'tests/models/test_epsanet.py::test_matches_reference_with_gradients[optimize_for_training-train-epsanet50]',
    'tests/models/test_epsanet.py::test_features_only_every_model',
    'tests/models/test_epsanet.py::test_authors_checkpoint_loads_through_timm[epsanet50]',
    'tests/models/test_epsanet.py::test_authors_checkpoint_loads_through_timm[epsanet101_large]',
    'tests/weights/test_convert.py::test_round_trip_gives_the_reference_logits',
    'tests/weights/test_hub.py',
    'tests/cli/test_train.py::test_train_cli_writes_a_run',
    'tests/test_predict.py::test_top1_equals_validate_and_corrupt_file_has_no_row',
    'tests/test_predict.py::test_cli_prints_names_summary_and_strict_fails',
    'tests/cli/test_validate.py::test_validate_cli_results_file',
    'tests/cli/test_extract.py::test_extract_cli_prelogits_and_stages',
    'tests/export/test_export.py::test_onnx_dynamic_batch_matches_pytorch',
    'tests/export/test_export.py::test_cli_export_loads_weights',
    'tests/optimize/test_transforms.py::test_training_transform_equals_the_plain_model[epsanet50]',
    'tests/optimize/test_transforms.py::test_float32_transforms_stay_close',
    'tests/optimize/test_transforms.py::test_inference_transform_folds_and_cannot_train',
)

# Tests that need more than the floor releases give, skipped (with the reason) only where it is missing.
_NO_EXPORT_DIM = (not _compat.HAS_EXPORT_DIM, f'torch {torch.__version__} has no torch.export.Dim (a newer torch)')
_NO_HF_DATA_CONFIG = (not _compat.save_for_hf_takes_data_config(),
                      f'timm {timm.__version__}: epsanet convert needs timm>=1.0.31 (save_for_hf data_config)')
NEEDS_NEWER = {  # node-id prefixes
    'tests/weights/test_convert.py::test_round_trip_gives_the_reference_logits': _NO_HF_DATA_CONFIG,
    'tests/weights/test_convert.py::test_folder_contents': _NO_HF_DATA_CONFIG,
    'tests/weights/test_convert.py::test_wrong_model_lists_mismatches_and_writes_nothing': _NO_HF_DATA_CONFIG,
    'tests/weights/test_hub.py': _NO_HF_DATA_CONFIG,  # its Hub repo fixture is an `epsanet convert` folder
    'tests/weights/test_label_names.py': _NO_HF_DATA_CONFIG,
    'tests/cli/test_convert_cli.py': _NO_HF_DATA_CONFIG,
    'tests/export/test_export.py::test_exported_program_dynamic_batch_matches_pytorch': _NO_EXPORT_DIM,
    'tests/export/test_export.py::test_large_model_exports[exported-program-m.pt2]': _NO_EXPORT_DIM,
    'tests/models/test_timm_contract.py::test_torch_export': _NO_EXPORT_DIM,
}


def pytest_collection_modifyitems(config, items):
    if 'floor' in (config.option.markexpr or ''):
        root = config.rootpath
        gone = [t for t in (*FLOOR_TESTS, *NEEDS_NEWER) if not (root / t.split('::')[0]).exists()]
        if gone:
            raise pytest.UsageError(f'tests/conftest.py lists test files that do not exist: {gone}')
        unmatched = [t for t in FLOOR_TESTS if not any(item.nodeid.startswith(t) for item in items)]
        if unmatched:  # a renamed test or parameter would drop out of the floor run silently
            raise pytest.UsageError(f'tests/conftest.py lists floor tests that match no test: {unmatched}')
    for item in items:
        if item.nodeid.startswith(FLOOR_TESTS):
            item.add_marker(pytest.mark.floor)
        for prefix, (missing, reason) in NEEDS_NEWER.items():
            if missing and item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope='session', autouse=True)
def _cache_in_a_temp_folder(tmp_path_factory):
    """The package's cache (webdataset shard indexes) goes to a folder of this test session, not ~/.cache."""
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
