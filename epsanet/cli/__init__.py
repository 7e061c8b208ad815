"""The ``epsanet`` command line: a thin layer over the Python API.

Each subcommand lives in its own module of this package and defines

* ``COMMAND``: its name,
* ``add_parser(subparsers) -> argparse.ArgumentParser``: its flags,
* ``run(args) -> int``: calls the Python API and returns the exit code,
* optionally ``BOUNDS``: ``{dest: epsanet.app.flags.Bound}`` for flags outside the shared table
  :data:`epsanet.app.flags.BOUNDS`; every value is checked before ``run`` is called.

``main`` finds the modules, so adding a subcommand means adding one file. It is also the one place
where errors reach the user: each as one line (``epsanet COMMAND: error: ...``) with a non-zero exit status,
never a traceback unless ``EPSANET_DEBUG=1`` is set.
"""
import argparse
import difflib
import importlib
import logging
import os
import pkgutil
import sys
from typing import List, Optional

from .. import __version__
from ..app.errors import error_message
from ..app.flags import check_namespace
from ..errors import EpsanetError


class CLIError(EpsanetError):
    """An error caused by the user's input: printed as one clear line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage block of a subcommand is dozens of lines)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith('_'):
            continue
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'COMMAND') and hasattr(module, 'add_parser') and hasattr(module, 'run'):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog='epsanet', description='EPSANet model zoo: models, weights, fine-tuning, features, benchmarks.')
    parser.add_argument('--version', action='version', version=f'epsanet {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for module in _command_modules():
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run, _bounds=getattr(module, 'BOUNDS', {}), _parser=sub)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: List[str]) -> str:
    """argparse's message for ``extras``, with the closest flag of the subcommand for a mistyped one."""
    flags = [s for action in parser._actions for s in action.option_strings]
    hints = [match[0] for x in extras if x.startswith('-')
             for match in [difflib.get_close_matches(x.split('=')[0], flags, n=1)] if match]
    return f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {', '.join(hints)}?)" if hints else '')


def main(argv: Optional[List[str]] = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print as \xNN, not a traceback
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # the subcommand's usage, not the top level's, and the flag meant where one is close
        command_parser = getattr(args, '_parser', parser)
        command_parser.error(_unrecognized(command_parser, extras))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if not getattr(args, '_run', None):
        parser.print_help()
        return 2
    try:
        check_namespace(args, args._bounds)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f'epsanet {args.command}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get('EPSANET_DEBUG') == '1':
            raise
        print(f'epsanet {args.command}: error: {error_message(e)}', file=sys.stderr)
        # 2: the input or options were wrong (our ValueErrors); 1: an operation failed (a file that cannot be written)
        return 2 if isinstance(e, CLIError) or (isinstance(e, EpsanetError) and isinstance(e, ValueError)) else 1


if __name__ == '__main__':
    sys.exit(main())
