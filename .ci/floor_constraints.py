"""Print a pip constraints file pinning every dependency in pyproject.toml to its declared floor.

``make test-floor`` installs with ``--constraint`` from this output, so the floor venv holds exactly the
oldest versions pyproject promises (``name>=X`` becomes ``name==X``), read from the one place they are
declared. Usage: ``python .ci/floor_constraints.py [EXTRA ...]`` (core dependencies plus the named extras).
"""
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

FLOOR = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)')


def floor_pins(project: dict, extras: list[str]) -> list[str]:
    """``name==floor`` for every ``name>=floor`` requirement of the core dependencies and ``extras``."""
    requirements = list(project['dependencies'])
    for extra in extras:
        requirements += project['optional-dependencies'][extra]
    pins = {}
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f'floor_constraints: {requirement!r} has no ">=" floor; pyproject declares ranges')
        pins[match.group(1).lower()] = f'{match.group(1)}=={match.group(2)}'
    return sorted(pins.values(), key=str.lower)


if __name__ == '__main__':
    pyproject = Path(__file__).resolve().parent.parent / 'pyproject.toml'
    print('\n'.join(floor_pins(tomllib.loads(pyproject.read_text())['project'], sys.argv[1:])))
