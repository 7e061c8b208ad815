"""The signal handling of ``epsanet train`` (:mod:`epsanet.train.interrupt`) with real signals."""
import collections
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from epsanet.train import interrupt
from epsanet.train.interrupt import GracefulStop, Interrupted, exit_code


def _wait(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_deferred_signal_is_a_request_until_the_loop_looks():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(grace_period=60) as stop:
        stop.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait(lambda: stop.requested() is not None)
        assert stop.requested() == signal.SIGTERM  # nothing was raised: the step in progress finishes
        with pytest.raises(Interrupted) as e, stop.immediate():  # a pending request stops on entering
            pass
        assert (e.value.signum, e.value.exit_code) == (signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back


@pytest.mark.parametrize('sig, code', [(signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_signal_outside_deferred_sections_raises_at_once(sig, code):
    with GracefulStop(grace_period=60):
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), sig)
            time.sleep(30)  # the handler raises out of the sleep
    assert isinstance(e.value, KeyboardInterrupt) and e.value.exit_code == code == exit_code(sig)


def test_a_second_signal_is_logged_not_fatal(caplog):
    with caplog.at_level(logging.WARNING), GracefulStop(grace_period=60) as stop:
        stop.deferred = True
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait(lambda: stop.requested() is not None)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards Ctrl-C as SIGTERM on top of the terminal's SIGINT
        assert _wait(lambda: 'received while stopping' in caplog.text)
        assert stop.requested() == signal.SIGINT


def test_grace_period_ends_a_process_that_cannot_save(tmp_path):
    # a real process whose loop never reaches a step boundary; interrupt.py needs only the standard library
    script = tmp_path / 'stuck.py'
    script.write_text(textwrap.dedent(f'''
        import importlib.util, logging, time
        spec = importlib.util.spec_from_file_location('interrupt', {str(Path(interrupt.__file__))!r})
        interrupt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(interrupt)
        logging.basicConfig()
        with interrupt.GracefulStop(grace_period=0.5) as stop:
            stop.deferred = True
            stop.last_saved = 'run/last.state.pth'
            print('ready', flush=True)
            while True:
                time.sleep(0.1)
        '''))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert 'could not save within the grace period of 0.5 s after SIGTERM' in err
    assert 'the last saved state is run/last.state.pth' in err


def test_pause_point_is_inert_without_its_environment(monkeypatch, tmp_path):
    marker = tmp_path / 'paused'
    monkeypatch.setattr(interrupt, '_reached', collections.Counter())
    monkeypatch.setenv('EPSANET_TEST_PAUSE_FILE', str(marker))
    monkeypatch.delenv('EPSANET_TEST_PAUSE_AT', raising=False)
    interrupt.pause_point('step')
    assert interrupt._reached == {} and not marker.exists()  # not counted, nothing written, no wait
    monkeypatch.setenv('EPSANET_TEST_PAUSE_AT', 'validate')  # armed for another point
    interrupt.pause_point('step')
    assert interrupt._reached == {} and not marker.exists()
    marker.write_text('already paused once')  # armed for this point: counted, and a marker that exists means
    monkeypatch.setenv('EPSANET_TEST_PAUSE_AT', 'step')  # the pause happened before, so it returns at once
    interrupt.pause_point('step')
    assert interrupt._reached == {'step': 1} and marker.read_text() == 'already paused once'


def test_forked_workers_ignore_the_signals_the_main_process_handles():
    # DataLoader workers are forked with the handlers installed; a SIGTERM to the whole process group must not
    # make them stop (or end them) while the main process still reads from them
    with GracefulStop(grace_period=60) as stop:
        stop.deferred = True
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                os._exit(0 if stop.requested() is None else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stop.requested() is None
