"""Test-session settings shared by every test (and the subprocesses they start)."""
import os

import pytest


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
