import io
import logging

from epsanet import progress as progress_mod
from epsanet.progress import LogProgress, progress


def test_log_progress_writes_plain_lines(caplog):
    caplog.set_level(logging.INFO, logger='epsanet.progress')
    items = list(LogProgress(range(5), desc='epoch 1/2', unit='img', log_interval=0))
    assert items == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # one per update (interval 0); the closing line would repeat the last one
    assert lines[-1].startswith('epoch 1/2: 5/5 (100%)') and 'img/s' in lines[-1]
    assert not any('\r' in line for line in lines)


def test_log_progress_interval_limits_lines(caplog):
    caplog.set_level(logging.INFO, logger='epsanet.progress')
    bar = LogProgress(total=1000, desc='x', log_interval=3600)
    for _ in range(1000):
        bar.update()
    bar.set_postfix(loss=0.5)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [lines[0]] and 'loss=0.5' in lines[0] and '1000/1000' in lines[0]


def test_progress_picks_form_by_stream(monkeypatch):
    monkeypatch.setattr(progress_mod.sys, 'stderr', io.StringIO())
    assert isinstance(progress(range(3)), LogProgress)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(progress_mod.sys, 'stderr', tty)
    bar = progress(range(3))
    assert not isinstance(bar, LogProgress)
    assert list(bar) == [0, 1, 2]
    assert '\r' in tty.getvalue()  # a real tqdm bar on a terminal


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger='epsanet.progress')
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]
    assert not caplog.records


def test_closing_line_after_unlogged_updates(caplog):
    caplog.set_level(logging.INFO, logger='epsanet.progress')
    bar = LogProgress(total=3, desc='v', log_interval=0)
    bar.update()
    bar.log_interval = 3600
    bar.update(2)
    bar.close()
    assert [r.getMessage().split(',')[0] for r in caplog.records] == ['v: 1/3 (33%)', 'v: 3/3 (100%)']
