"""The README's Python examples run as written (those that need no file, URL or Hub repo)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
NEEDS_OUTSIDE_DATA = ('.pth.tar', 'https://', 'hf-hub:', 'runs/mine', 'model.safetensors')


def _python_blocks():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    return [b for b in blocks if not any(marker in b for marker in NEEDS_OUTSIDE_DATA)]


def test_readme_has_runnable_examples():
    assert len(_python_blocks()) >= 5


@pytest.mark.slow
@pytest.mark.parametrize('block', _python_blocks(), ids=lambda b: b.strip().splitlines()[0][:40])
def test_readme_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(block, str(README), 'exec'), {'__name__': '__readme__'})
