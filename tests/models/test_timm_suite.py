"""timm's own model test suite (tests/test_models.py of the installed timm release) on the EPSANet models.

timm's wheel has no tests, so the test fetches the matching source release from PyPI with pip (the
one network source this project's machines reach) and runs its test_models.py in a subprocess with
``-p epsanet`` (importing epsanet registers the models before timm's tests collect their list)."""
import subprocess
import sys
import tarfile

import pytest
import timm


@pytest.mark.slow
def test_timms_own_model_tests_pass_on_epsanet(tmp_path):
    fetch = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', f'timm=={timm.__version__}',
         '-d', str(tmp_path), '--quiet'], capture_output=True, text=True, timeout=300)
    if fetch.returncode != 0:
        pytest.skip(f'could not fetch the timm {timm.__version__} source release from PyPI: {fetch.stderr[-300:]}')
    archive = next(tmp_path.glob('timm-*.tar.gz'))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if '/tests/' in m.name]
        tar.extractall(tmp_path, members=members, filter='data')
    tests = next(tmp_path.glob('timm-*/tests'))
    out = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'epsanet', '-p', 'no:cacheprovider', 'test_models.py',
         '-k', 'epsanet'], cwd=tests, capture_output=True, text=True, timeout=1500)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = int(summary.split(' passed')[0].split()[-1])
    assert passed >= 28 and 'failed' not in summary, summary  # forward, backward, cfgs, torchscript, fx, features
