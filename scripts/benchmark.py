#!/usr/bin/env python3
"""Same as ``epsanet benchmark`` (see ``--help``); kept for ``make benchmark``."""
import sys

from epsanet.cli import main

if __name__ == '__main__':
    sys.exit(main(['benchmark', *sys.argv[1:]]))
