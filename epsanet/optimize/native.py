"""Small C kernels for the CPU transforms, compiled on first use with the machine's C compiler.

The sources live in ``epsanet/optimize/kernels/*.c`` (plain C with OpenMP, no PyTorch headers, so a
build takes about a second). :func:`load` compiles one with ``$CC`` (else ``cc``, else ``gcc``) and
``-O3 -march=native -fopenmp`` (``EPSANET_NATIVE_MARCH=haswell``, for example, builds for another ISA:
to measure what an AVX2-only CPU would run), keeps the shared library in the cache folder
(``$EPSANET_CACHE_DIR/kernels``, see :mod:`epsanet.cache`) under a name that holds a hash of the source,
the compiler's version, the flags and the CPU, and loads it with :mod:`ctypes`. The library's OpenMP
calls go to the runtime that PyTorch has already loaded (``libgomp.so.1``), so both share one thread pool.

Where no compiler is found, a build fails or ``EPSANET_NATIVE_KERNELS=0`` is set, :func:`load` returns
None after one log line, and the transforms keep PyTorch's own kernels: slower, never wrong.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch  # noqa: F401  (loads libgomp.so.1 before any kernel library needs it)

from ..cache import cache_dir
from ..files import atomic_write

__all__ = ['ENV_NATIVE', 'ENV_MARCH', 'flags', 'load', 'compiler', 'library_path']

_logger = logging.getLogger(__name__)

ENV_NATIVE = 'EPSANET_NATIVE_KERNELS'
ENV_MARCH = 'EPSANET_NATIVE_MARCH'
SOURCES = Path(__file__).resolve().parent / 'kernels'
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_loaded: Dict[str, Optional[ctypes.CDLL]] = {}


def compiler() -> Optional[str]:
    """The C compiler :func:`load` uses: ``$CC``, else ``cc`` or ``gcc`` on the PATH; None when there is none."""
    cc = os.environ.get('CC')
    if cc:
        return shutil.which(cc) or cc
    return shutil.which('cc') or shutil.which('gcc')


def flags() -> Tuple[str, ...]:
    """The compiler flags: ``-march`` from ``$EPSANET_NATIVE_MARCH`` (default ``native``: the running CPU)."""
    march = os.environ.get(ENV_MARCH, '').strip() or 'native'
    return ('-O3', f'-march={march}', '-fopenmp', '-fPIC', '-shared')


def _enabled() -> bool:
    return os.environ.get(ENV_NATIVE, '1').strip().lower() not in ('0', 'off', 'false', 'no')


def _cpu_description() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, '--version'], capture_output=True, text=True, timeout=60)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ''


def library_path(name: str, cc: str) -> Path:
    """Where the built library for source ``name`` goes: its file name holds a hash of everything that
    decides the machine code (source, compiler version, flags, CPU model and ISA flags, architecture)."""
    source = (SOURCES / f'{name}.c').read_bytes()
    key = hashlib.sha256(b'\0'.join([
        source, _compiler_version(cc).encode(), ' '.join(flags()).encode(), _cpu_description().encode(),
        platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    return (folder / 'kernels' if folder is not None else Path(tempfile.gettempdir())) / f'{name}-{key}.so'


def _build(name: str, cc: str, path: Path) -> None:
    """Compile ``kernels/<name>.c`` into ``path`` (atomically: a failed build leaves nothing there)."""
    def write(tmp: str) -> None:
        cmd: List[str] = [cc, *flags(), str(SOURCES / f'{name}.c'), '-o', tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f'`{" ".join(cmd)}` failed ({out.returncode}): {out.stderr.strip()[-800:]}')
    atomic_write(path, write, suffix='.so')


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled library of ``kernels/<name>.c``, built on first use; None (after one log line) when
    native kernels are off, no C compiler is found or the build fails."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name)
        return _loaded[name]


def _build_and_load(name: str) -> Optional[ctypes.CDLL]:
    if not _enabled():
        _logger.info(f'{ENV_NATIVE}=0: the {name} kernels are off; PyTorch\'s own kernels run instead.')
        return None
    cc = compiler()
    if cc is None:
        _logger.warning(f'No C compiler found (cc, gcc or $CC): the {name} kernels are off and PyTorch\'s own '
                        'kernels run instead (slower, same results). Install gcc or set CC to enable them.')
        return None
    try:
        path = library_path(name, cc)
        if not path.exists():
            _logger.info(f'Building the {name} kernels with {cc} (once per machine) into {path}')
            _build(name, cc, path)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _logger.warning(f'The {name} kernels could not be built or loaded, so PyTorch\'s own kernels run instead '
                        f'(slower, same results): {e}')
        return None
