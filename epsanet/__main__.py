"""``python -m epsanet`` is the ``epsanet`` command."""
import sys

from .cli import main

sys.exit(main())
