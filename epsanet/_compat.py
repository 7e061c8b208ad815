"""Compatibility with the oldest releases pyproject.toml allows: the import-time floor check, and shims.

``check_versions()`` runs when this module is imported, first thing in ``import epsanet``: below a declared
floor of torch, torchvision or timm, the import fails at once with one line naming the installed and the
required versions (the floors are read from the installed package's metadata, i.e. pyproject.toml; nothing
here repeats them). The shims give one call for what an old supported torch spells differently.
"""
import contextlib
import inspect
import re
from importlib import metadata

import torch

CHECKED = ('torch', 'torchvision', 'timm')  # the ones that otherwise fail deep inside a model build or a job
_FLOOR = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([^,;\s]+)\s*(?:,[^;]*)?$')


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string: ``'2.1.2+cu121'`` -> ``(2, 1, 2)``."""
    return tuple(int(part) for part in re.match(r'\d+(?:\.\d+)*', version).group().split('.'))


def declared_floors() -> dict[str, str]:
    """``{name: floor}`` of epsanet's core ``name>=floor`` requirements, from the installed metadata.

    Empty when epsanet runs from a source tree that was never installed (no metadata to read)."""
    try:
        requirements = metadata.requires('epsanet') or []
    except metadata.PackageNotFoundError:
        return {}
    floors = {}
    for requirement in requirements:
        match = _FLOOR.match(requirement)  # requirements with a marker (the extras) do not match
        if match:
            floors[match.group(1).lower()] = match.group(2)
    return floors


def check_versions() -> None:
    """Raise ``ImportError`` (one line) if torch, torchvision or timm is older than epsanet's declared floor."""
    floors = declared_floors()
    too_old = []
    for name in CHECKED:
        if name not in floors:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a missing package fails on its own import, with its own clear message
        if release(installed) < release(floors[name]):
            too_old.append(f'{name} {installed} is installed, epsanet needs {name}>={floors[name]}')
    if too_old:
        raise ImportError('; '.join(too_old) + ' (pip install -U ' + ' '.join(
            f'"{n}>={floors[n]}"' for n in CHECKED if any(s.startswith(n + ' ') for s in too_old)) + ')')


def _autocast_takes_a_device() -> bool:
    try:
        torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4: is_autocast_enabled() is CUDA's, is_autocast_cpu_enabled() the CPU's
        return False
    return True


if _autocast_takes_a_device():
    autocast_enabled = torch.is_autocast_enabled
else:
    def autocast_enabled(device_type: str) -> bool:
        """``torch.is_autocast_enabled(device_type)`` of torch >= 2.4."""
        return torch.is_autocast_cpu_enabled() if device_type == 'cpu' else torch.is_autocast_enabled()

check_versions()

# torch.export.export(dynamic_shapes={0: torch.export.Dim(...)}): missing in torch 2.1 (the floor)
HAS_EXPORT_DIM = hasattr(torch.export, 'Dim')

# torch.compiler.is_compiling() of torch >= 2.3; before, torch._dynamo.is_compiling()
is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling


def onnx_export(model: torch.nn.Module, args: tuple, path: str, **kwargs) -> None:
    """``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``, the default of torch < 2.9;
    torch < 2.5 has no ``dynamo`` argument)."""
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False
    torch.onnx.export(model, args, path, **kwargs)


def safe_globals(allowed: list):
    """``torch.serialization.safe_globals(allowed)`` (torch >= 2.5): ``torch.load(weights_only=True)`` may also
    rebuild these classes. Older torch cannot allow any, so a checkpoint holding them is refused as unsafe."""
    if hasattr(torch.serialization, 'safe_globals'):
        return torch.serialization.safe_globals(allowed)
    return contextlib.nullcontext()


def save_for_hf_takes_data_config() -> bool:
    """Whether timm's ``save_for_hf`` records the preprocessing (``data_config=``): timm >= 1.0.31."""
    from timm.models import save_for_hf
    return 'data_config' in inspect.signature(save_for_hf).parameters
