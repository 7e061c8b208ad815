"""The ``epsanet`` command line: a thin layer over the Python API.

Each subcommand lives in its own module of this package and defines

* ``COMMAND``: its name,
* ``add_parser(subparsers) -> argparse.ArgumentParser``: its flags,
* ``run(args) -> int``: calls the Python API and returns the exit code.

``main`` finds the modules, so adding a subcommand means adding one file.
"""
import argparse
import importlib
import logging
import pkgutil
import sys
from typing import List, Optional

from .. import __version__
from ..errors import EpsanetError


class CLIError(EpsanetError):
    """An error caused by the user's input: printed as one clear line, no traceback."""


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith('_'):
            continue
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'COMMAND') and hasattr(module, 'add_parser') and hasattr(module, 'run'):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='epsanet', description='EPSANet model zoo: models, weights, fine-tuning, features, benchmarks.')
    parser.add_argument('--version', action='version', version=f'epsanet {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for module in _command_modules():
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print as \xNN, not a traceback
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if not getattr(args, '_run', None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f'epsanet {args.command}: error: {e}', file=sys.stderr)
        return 2
    except EpsanetError as e:  # bad input (a ValueError: 2), or a failed operation (a file that cannot be written: 1)
        print(f'epsanet {args.command}: error: {e}', file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        print(f'epsanet {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
