"""timm's own model test suite (tests/test_models.py of the installed timm release) on the EPSANet models.

timm's wheel has no tests, so the test fetches the matching source release from PyPI with pip (the
one network source this project's machines reach) and runs its test_models.py in a subprocess with
``-p epsanet`` (importing epsanet registers the models before timm's tests collect their list). When the release
cannot be fetched, the test fails under ``CI=true`` and skips, saying why, elsewhere."""
import os
import subprocess
import sys
import tarfile

import pytest
import timm


def in_ci() -> bool:
    """CI sets ``CI=true`` (as GitHub Actions, GitLab and most runners do)."""
    return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


def unavailable(reason: str) -> None:
    """timm's tests cannot be had: in CI that is a failure (the one run of timm's own suite must not vanish
    silently); elsewhere (e.g. offline) a skip that shows the reason."""
    if in_ci():
        pytest.fail(f'CI=true: {reason}', pytrace=False)
    pytest.skip(reason)


def test_without_timms_tests_ci_fails_and_elsewhere_skips_with_the_reason(monkeypatch):
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI=true: no index'):
        unavailable('no index')
    monkeypatch.delenv('CI')
    with pytest.raises(pytest.skip.Exception, match='^no index$'):
        unavailable('no index')


@pytest.mark.slow
def test_timms_own_model_tests_pass_on_epsanet(tmp_path):
    fetch = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', f'timm=={timm.__version__}',
         '-d', str(tmp_path), '--quiet'], capture_output=True, text=True, timeout=300)
    archives = sorted(tmp_path.glob('timm-*.tar.gz'))
    if fetch.returncode != 0 or not archives:
        unavailable(f'could not fetch the timm {timm.__version__} source release from PyPI (pip download exit '
                    f'{fetch.returncode}): {fetch.stderr.strip()[-300:]}')
    archive = archives[0]
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
