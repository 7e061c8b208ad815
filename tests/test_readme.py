"""Every example in README.md and on every page of docs/ runs, and prints what the text says it prints.

How a page is run (:func:`run_page`):

* Every fenced block needs a language. ``python`` and ``bash`` blocks run; ``text``, ``yaml`` and the
  like are not code.
* The blocks of one page run in order in one fresh folder, like a notebook: the Python blocks share one
  namespace in this process, each bash block runs in ``bash -e -o pipefail`` with the installed
  ``epsanet`` console script on PATH. The folder holds what the pages call "your" files (:func:`_setup`):
  ``my_images/`` (an ImageFolder: ``train/`` and ``val/``, classes ``cat`` and ``dog``, 32 px) and
  ``runs/mine/best.safetensors`` (untrained 2-class ``epsanet50`` weights in the format
  ``epsanet train`` writes).
* A README block that repeats what a docs page runs is run there only: each line of a bash block, and the
  lines of a python block as one contiguous piece, must appear in a runnable block of a docs page.
* A block that cannot run here (GPUs, the real Hub, minutes of work) has ``<!-- not run: REASON -->``
  on the line before it; the reason is required.

What is compared:

* A comment on a ``print(...)`` line states what that call prints: every line it prints must match the
  comment (``...`` stands for any text).
* A ``text`` block right after a code block (only blank lines between) is that block's output: each of
  its non-empty lines must appear, in order, among the lines the block printed (stdout and stderr).
"""
import ast
import contextlib
import io
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').rglob('*.md'))
RUN = ('python', 'bash')
NOT_CODE = ('text', 'yaml', 'json', 'csv', 'markdown')
NOT_RUN = re.compile(r'<!--\s*not run:(.*?)-->', re.S)
FENCE = re.compile(r'^```(\S*)\s*$')

FAST_ENV = {'PYTHONUNBUFFERED': '1', 'HF_HUB_OFFLINE': '1'}


@dataclass
class Block:
    page: Path
    line: int                      # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str] = None  # the reason, when marked
    output: Optional[str] = None   # the text block shown right after it
    printed: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line} ({self.lang})'


def parse(page: Path) -> List[Block]:
    """The fenced blocks of a markdown file; a ``text`` block that directly follows a code block is its output."""
    lines = page.read_text().splitlines()
    blocks: List[Block] = []
    previous: Optional[Block] = None  # the last code block, while only blank lines follow it
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = None
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == '```'), None)
        assert end is not None, f'{page.name}:{start + 1}: a fence that is never closed'
        code = '\n'.join(lines[start + 1:end]) + '\n'
        if lang == 'text' and previous is not None:
            previous.output = code
            previous = None
        else:
            before = '\n'.join(lines[max(0, start - 3):start])
            marks = NOT_RUN.findall(before.split('```')[-1])
            block = Block(page, start + 1, lang, code, not_run=marks[-1].strip() if marks else None)
            blocks.append(block)
            previous = block if lang in RUN else None
        i = end + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in parse(page)]
README = ROOT / 'README.md'


def _lines(code: str) -> List[str]:
    return [line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith('#')]


def runs_on_a_docs_page(block: Block) -> bool:
    """Whether ``block`` (of the README) repeats lines that a docs page runs, so running it there suffices."""
    runnable = [b for b in ALL_BLOCKS if b.page != README and b.lang == block.lang and b.not_run is None]
    lines = _lines(block.code)
    if block.lang == 'bash':
        return all(any(line in _lines(b.code) for b in runnable) for line in lines)
    joined = '\n'.join(lines)
    return any(joined in '\n'.join(_lines(b.code)) for b in runnable)


def _matches(pattern: str, text: str) -> bool:
    regex = '.*'.join(re.escape(part.strip()) for part in pattern.strip().split('...'))
    return re.fullmatch(regex, text.strip(), flags=re.S) is not None


def _print_claims(code: str) -> List[tuple]:
    """``(lines, comment)`` of each ``print(...)`` statement with a comment on its last line."""
    comments = {tok.start[0]: tok.string.lstrip('#').strip()
                for tok in tokenize.generate_tokens(io.StringIO(code).readline) if tok.type == tokenize.COMMENT}
    claims = []
    for node in ast.walk(ast.parse(code)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == 'print'
                and comments.get(node.end_lineno)):
            claims.append((range(node.lineno, node.end_lineno + 1), comments[node.end_lineno]))
    return claims


def _run_python(block: Block, namespace: dict) -> str:
    filename = f'<{block}>'
    claims = _print_claims(block.code)
    seen: Dict[int, List[str]] = {i: [] for i in range(len(claims))}
    real_print = print

    def checked_print(*args, sep=' ', end='\n', file=None, flush=False):
        frame = sys._getframe(1)
        if file is None and frame.f_code.co_filename == filename:
            for i, (lines, _) in enumerate(claims):
                if frame.f_lineno in lines:
                    seen[i].append(sep.join(map(str, args)))
        real_print(*args, sep=sep, end=end, file=file, flush=flush)

    namespace['print'] = checked_print
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, filename, 'exec'), namespace)
    for i, (lines, comment) in enumerate(claims):
        assert seen[i], f'{block}, line {lines.start}: the print that states {comment!r} never ran'
        for printed in seen[i]:
            assert _matches(comment, printed), \
                f'{block}, line {lines.start}: printed {printed!r}, the text says {comment!r}'
    return out.getvalue()


def _run_bash(block: Block, cwd: Path) -> str:
    env = dict(os.environ, **FAST_ENV)
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    proc = subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', block.code], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, f'{block} exited with {proc.returncode}:\n{proc.stdout[-4000:]}'
    return proc.stdout


def _check_output(block: Block, printed: str) -> None:
    lines = printed.splitlines()
    i = 0
    for expected in (e for e in block.output.splitlines() if e.strip()):
        while i < len(lines) and not _matches(expected, lines[i]):
            i += 1
        assert i < len(lines), \
            f'{block}: the shown output line {expected!r} is not in what it printed:\n{printed[-4000:]}'
        i += 1


def _setup(folder: Path) -> None:
    """The files the pages call yours: a tiny image folder and a tiny checkpoint."""
    import timm
    import torch

    from epsanet.data import write_image_folder
    from epsanet.train.checkpoint import save_weights

    write_image_folder(folder / 'my_images', classes=('cat', 'dog'), splits={'train': 4, 'val': 2}, size=32)
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=2)
    save_weights(folder / 'runs' / 'mine' / 'best.safetensors', model.state_dict(),
                 dict(model='epsanet50', num_classes=2, classes=['cat', 'dog'], img_size=32, crop_pct=1.0))


def run_page(page: Path, folder: Path) -> List[Block]:
    """Run every runnable block of ``page`` in ``folder``; return them."""
    _setup(folder)
    namespace = {'__name__': '__docs__'}
    ran = []
    for block in parse(page):
        if block.lang not in RUN or block.not_run is not None or (page == README and runs_on_a_docs_page(block)):
            continue
        printed = _run_python(block, namespace) if block.lang == 'python' else _run_bash(block, folder)
        if block.output is not None:
            _check_output(block, printed)
        ran.append(block)
    return ran


def test_every_block_is_run_or_says_why_not():
    unknown = [str(b) for b in ALL_BLOCKS if b.lang not in RUN + NOT_CODE]
    assert not unknown, f'fenced blocks need a language ({RUN} run, {NOT_CODE} do not): {unknown}'
    skipped = [b for b in ALL_BLOCKS if b.not_run is not None]
    assert all(b.not_run for b in skipped), [str(b) for b in skipped if not b.not_run]
    assert all(b.lang in RUN for b in skipped), 'a not-run mark only belongs before a python or bash block'
    runnable = [b for b in ALL_BLOCKS if b.lang in RUN and b.not_run is None]
    print(f'{len(runnable)} examples run, {len(skipped)} not run:',
          *(f'  {b}: {b.not_run}' for b in skipped), sep='\n')
    # not running stays the exception; the performance page's commands are the benchmark runs its tables come
    # from (speed is measured by the benchmark, never by timed tests), so they do not count against it
    elsewhere = [b for b in skipped if b.page.name != 'performance.md']
    assert len(runnable) >= 2 * len(elsewhere)


def test_readme_model_table_is_what_epsanet_models_prints():
    """The README's params and GFLOPs are the ones in the docs' ``epsanet models`` output, which is checked."""
    shown = next(b.output for b in ALL_BLOCKS if b.code.strip() == 'epsanet models' and b.output and b.page != README)
    row = r'^\| `(epsanet\w+)`[^|]*\|(?:[^|]*\|){3} ([\d,]+) \| ([\d.]+) \|'
    rows = re.findall(row, README.read_text(), flags=re.M)
    assert len(rows) == 4
    for name, params, gflops in rows:
        assert re.search(rf'\| {name} +\| +{params} \| +{gflops} \|', shown), (name, params, gflops)


def test_readme_repeats_run_on_docs_pages():
    blocks = [b for b in parse(README) if b.lang in RUN and b.not_run is None]
    covered = [b for b in blocks if runs_on_a_docs_page(b)]
    print(f'README: {len(covered)} of {len(blocks)} runnable blocks repeat a docs page and run there')
    assert not runs_on_a_docs_page(Block(README, 1, 'bash', 'epsanet no-such-command\n'))


def test_readme_is_the_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert 'make demo' in text and 'make test' in text
    for link in re.findall(r'\]\((docs/[^)#]+)', text):
        assert (ROOT / link).is_file(), link


def test_shown_outputs_follow_code():
    stray = [str(b) for b in ALL_BLOCKS if b.lang == 'text' and not b.code.strip()]
    assert not stray, f'empty text blocks: {stray}'


def test_matching_can_fail():
    assert _matches('torch.Size([1, 10])', 'torch.Size([1, 10])')
    assert _matches('(12 rows ...; photos-feats)', '(12 rows of features (12, 2048); photos-feats)')
    assert not _matches('torch.Size([1, 10])', 'torch.Size([1, 11])')
    block = Block(ROOT / 'README.md', 1, 'python', 'x = 3\nprint(x + 1)  # 5\n')
    with pytest.raises(AssertionError, match='the text says'):
        _run_python(block, {})
    shown = Block(ROOT / 'README.md', 1, 'bash', 'echo a; echo b\n', output='b\na\n')
    with pytest.raises(AssertionError, match='not in what it printed'):
        _check_output(shown, 'a\nb\n')


@pytest.mark.slow
@pytest.mark.parametrize('page', [p for p in PAGES if any(b.lang in RUN and b.not_run is None and not (
    p == README and runs_on_a_docs_page(b)) for b in parse(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    ran = run_page(page, tmp_path)
    assert ran
