"""``epsanet.files.atomic_write``: whole files or none, with the usual permissions."""
import errno
import os
import stat

import pytest

from epsanet.cli import main
from epsanet.files import FileWriteError, atomic_write, file_mode


def test_writes_with_the_umask_permissions_and_no_temporaries(tmp_path):
    target = tmp_path / 'sub' / 'out.json'
    atomic_write(target, lambda tmp: open(tmp, 'w').write('{}'))
    assert target.read_text() == '{}'
    assert stat.S_IMODE(os.stat(target).st_mode) == file_mode()  # not mkstemp's 0600
    assert os.listdir(target.parent) == ['out.json']


def test_a_failed_write_keeps_the_old_file_and_says_why(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')

    def full_disk(tmp):
        open(tmp, 'w').write('half')
        raise OSError(errno.ENOSPC, 'No space left on device')

    with pytest.raises(FileWriteError, match='disk is full; the previous version of it is intact'):
        atomic_write(target, full_disk)
    assert target.read_text() == 'old' and os.listdir(tmp_path) == ['out.txt']
    with pytest.raises(KeyboardInterrupt):  # interrupted: no temporary file left either
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == ['out.txt']


def test_the_temporary_file_can_keep_the_extension(tmp_path):
    seen = []
    atomic_write(tmp_path / 'm.pt2', seen.append, suffix='.pt2')
    assert seen[0].endswith('.pt2') and (tmp_path / 'm.pt2').exists()


def test_cli_prints_a_write_failure_in_one_line(tmp_path, capsys):
    """A results file that cannot be written (here: its folder is a file) ends the command with one error line."""
    blocker = tmp_path / 'file'
    blocker.write_text('')
    code = main(['benchmark', '--model', 'epsanet50', '--batch-size', '1', '--img-size', '32', '--modes', 'infer',
                 '--formats', 'nchw', '--baselines', '--batch-sweep', '--img-sweep', '--reps', '1', '--no-memory',
                 '--runtime', 'torch', '--no-optimize', '--no-progress', '--json', str(blocker / 'r.json')])
    err = capsys.readouterr().err
    assert code != 0 and 'epsanet benchmark: error:' in err and 'Traceback' not in err
