"""Every hint in an error names only flags the command has: each ``--flag`` in the messages that a command's
own modules and the application layer raise is parsed against that command's parser.

The messages a command actually printed are checked the same way by tests/cli/test_options.py and
tests/cli/test_faults.py. The library (data, weights, ...) is left out here: it is shared by commands with
different flags, so its messages should name none (those that still name data-source flags are reached only by
the commands that have them).
"""
import ast
import copy
import importlib.util
import re

import pytest

from epsanet.cli import _command_modules, build_parser

# import-linter's graph library, from the test extra (the floor venv of `make test-floor` has no test extra)
grimp = pytest.importorskip('grimp', reason='grimp (import-linter, the test extra) is not installed')

FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9-]*')

# the job modules behind each command (the application layer is added from the import graph)
JOBS = {
    'train': ['epsanet.train'], 'validate': ['epsanet.train.validate'], 'predict': ['epsanet.predict'],
    'extract': ['epsanet.features'], 'explain': ['epsanet.explain'], 'quantize': ['epsanet.quantize'],
    'export': ['epsanet.export'], 'benchmark': ['epsanet.benchmark'], 'convert': ['epsanet.weights.convert'],
    'push': ['epsanet.weights.publish'], 'models': [],
}
NOT_OF = {'train': {'epsanet.train.validate'}}  # validate's module lives in the train package


def _hints(module: str):
    """(line, flag) for every flag named in a string that a ``raise`` statement of ``module`` builds."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    for flag in FLAG.findall(part.value):
                        yield node.lineno, flag


@pytest.fixture(scope='module')
def graph():
    return grimp.build_graph('epsanet')


def _job_modules(graph, command: str):
    found = {m for job in JOBS[command] for m in graph.modules if m == job or m.startswith(job + '.')}
    return found - NOT_OF.get(command, set())


def _modules(graph, command: str, cli_module: str):
    """The command's own modules, and the application-layer modules it reaches without going through another
    command's job (benchmark imports one function of quantize, not quantize's model loading)."""
    own = _job_modules(graph, command)
    graph = copy.deepcopy(graph)
    for other in set(JOBS) - {command}:
        for m in _job_modules(graph, other) - own:
            graph.remove_module(m)
    app = {m for m in graph.find_upstream_modules(cli_module) if m.startswith('epsanet.app')}
    return sorted(own | app | {cli_module})


def test_every_command_is_covered():
    assert {m.COMMAND for m in _command_modules()} == set(JOBS)


@pytest.mark.parametrize('module', list(_command_modules()), ids=lambda m: m.COMMAND)
def test_hints_name_only_the_command_s_flags(module, graph):
    subparsers = next(a for a in build_parser()._actions if isinstance(getattr(a, 'choices', None), dict))
    flags = {o for action in subparsers.choices[module.COMMAND]._actions for o in action.option_strings}
    wrong = [f'{m}:{line} {flag}' for m in _modules(graph, module.COMMAND, module.__name__)
             for line, flag in _hints(m) if flag not in flags]
    assert not wrong, f'epsanet {module.COMMAND} has no such flags: ' + ', '.join(wrong)
