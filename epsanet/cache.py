"""Where the package keeps what it measures or computes once per machine (webdataset
shard indexes): ``$EPSANET_CACHE_DIR``, else ``$XDG_CACHE_HOME/epsanet``, else ``~/.cache/epsanet``.
``EPSANET_CACHE_DIR=none`` keeps nothing on disk."""
import os
from pathlib import Path
from typing import Optional

__all__ = ['ENV_CACHE', 'cache_dir']

ENV_CACHE = 'EPSANET_CACHE_DIR'


def cache_dir() -> Optional[Path]:
    """The cache folder (not created here), or None when caching on disk is off."""
    folder = os.environ.get(ENV_CACHE)
    if folder and folder.lower() in ('none', 'off', '0'):
        return None
    return Path(folder) if folder else Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'epsanet'
