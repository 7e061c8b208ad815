"""epsanet/app/errors.py: the one line a user sees for an OS, network or unexpected error."""
import errno
import os
import urllib.error

import pytest

from epsanet.app.errors import ConfigError, error_message, os_error_message
from epsanet.files import FileWriteError


@pytest.mark.parametrize('code, cause', [
    (errno.ENOSPC, 'no space left on the device'),
    (errno.EACCES, 'permission denied'),
    (errno.EROFS, 'read-only'),
    (errno.ENOTDIR, 'a part of the path is a file, not a folder'),
    (errno.EEXIST, 'already exists'),
])
def test_os_errors_name_the_path_and_the_cause(code, cause):
    message = error_message(OSError(code, os.strerror(code), '/data/run/best.safetensors'))
    assert message == f'/data/run/best.safetensors: {os_error_message(OSError(code, "x"))}'
    assert cause in message and '\n' not in message


def test_a_rename_names_both_paths():
    e = OSError(errno.EXDEV, 'Invalid cross-device link', 'run/a.tmp', None, 'other-disk/a')
    assert error_message(e) == 'run/a.tmp -> other-disk/a: Invalid cross-device link'


def test_a_refused_connection_says_so():
    e = urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, 'Connection refused'))
    assert 'connection was refused' in error_message(e)


def test_the_package_s_own_errors_keep_their_message():
    message = '--drop must be >= 0 and < 1; got 1.5.'
    assert error_message(ConfigError(message)) == message
    e = FileWriteError('could not write x: the disk is full; no previous version existed.')
    assert error_message(e) == str(e)


def test_any_other_error_is_its_first_line_with_the_way_to_the_traceback():
    message = error_message(RuntimeError('boom\n  a long\n  dump'))
    assert message.startswith('RuntimeError: boom (') and 'EPSANET_DEBUG=1' in message
