"""The output policy's pieces, in-process (the commands that use it: tests/cli/test_bad_input*.py)."""
import os
import socket
import subprocess
import sys

import pytest

from epsanet.app.outputs import LOCK_NAME, OutputError, RunFolder, check_new, check_not_input, check_output_file


def test_an_output_that_is_an_input_is_refused_through_links_and_other_spellings(tmp_path):
    src = tmp_path / 'w.safetensors'
    src.write_bytes(b'weights')
    os.link(src, tmp_path / 'hard')
    os.symlink(src, tmp_path / 'soft')
    (tmp_path / 'sub').mkdir()
    for out in (src, tmp_path / 'hard', tmp_path / 'soft', tmp_path / 'sub' / '..' / 'w.safetensors'):
        with pytest.raises(OutputError, match='that this command reads'):
            check_output_file(out, [src], overwrite=True)  # --overwrite never allows it
    check_not_input([tmp_path / 'new.json'], [src, '', None, 'hf-hub:org/name'])


def test_an_output_folder_may_not_be_or_hold_an_input(tmp_path):
    data = tmp_path / 'data' / 'a'
    data.mkdir(parents=True)
    (data / 'x.png').write_bytes(b'png')
    with pytest.raises(OutputError, match='that this command reads'):
        check_not_input([tmp_path / 'data'], [tmp_path / 'data'])
    with pytest.raises(OutputError, match='holds the input'):
        check_not_input([tmp_path], [data / 'x.png'])
    check_not_input([data / 'out'], [data / 'x.png'])  # a new folder inside the inputs' folder is fine


def test_an_existing_file_needs_overwrite(tmp_path):
    mine = tmp_path / 'mine.npy'
    mine.write_bytes(b'data')
    with pytest.raises(OutputError, match='did not make it; pass --overwrite'):
        check_new([mine], overwrite=False)
    check_new([mine, tmp_path / 'new.npy'], overwrite=True)
    with pytest.raises(OutputError, match='is a folder'):
        check_new([tmp_path], overwrite=True)
    with pytest.raises(OutputError, match='is a file, not a folder'):
        check_new([mine / 'x.json'], overwrite=True)


def test_a_run_folder_is_locked_and_an_existing_run_refused(tmp_path):
    run = tmp_path / 'run'
    with RunFolder(run).claim(resume=False, overwrite=False) as folder:
        assert folder.created and (run / LOCK_NAME).read_text().startswith(f'pid={os.getpid()}\n')
        with pytest.raises(OutputError, match=f'in use by another run \\(PID {os.getpid()}'):
            RunFolder(run).claim(resume=True, overwrite=True)
    assert not run.exists()  # created, nothing written: removed again
    run.mkdir()
    (run / 'last.state.pth').write_bytes(b'state')
    with pytest.raises(OutputError, match='Resume it with: CMD .* --overwrite'):
        RunFolder(run).claim(resume=False, overwrite=False, resume_command='CMD')
    with pytest.raises(OutputError, match='no run to resume'):
        RunFolder(run).claim(resume=False, overwrite=False)
    for resume, overwrite in ((True, False), (False, True)):
        with RunFolder(run).claim(resume=resume, overwrite=overwrite):
            pass
    assert sorted(os.listdir(run)) == ['last.state.pth']
    with pytest.raises(OutputError, match='is a file'):
        RunFolder(run / 'last.state.pth').claim(resume=False, overwrite=True)


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    run = tmp_path / 'run'
    run.mkdir()
    (run / LOCK_NAME).write_text(f'pid={int(dead.stdout)}\nstarted=1\nhost={socket.gethostname()}\n')
    with RunFolder(run).claim(resume=False, overwrite=False):
        assert (run / LOCK_NAME).read_text().startswith(f'pid={os.getpid()}\n')
    assert not (run / LOCK_NAME).exists()
    (run / LOCK_NAME).write_text(f'pid={os.getpid()}\nstarted=\nhost=another-host\n')  # cannot be checked: kept
    with pytest.raises(OutputError, match='on another-host'):
        RunFolder(run).claim(resume=True, overwrite=False)
