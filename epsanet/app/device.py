"""Where a command runs: the device (checked to exist, see :func:`resolve_device`), the distributed set-up
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and mixed precision (:func:`autocast_for`)."""
import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so, is_distributed_env

__all__ = ['DistInfo', 'init_distributed', 'all_reduce_sum', 'all_reduce_max', 'autocast_for', 'device_problem']

_logger = logging.getLogger(__name__)


def device_problem(name: str) -> Optional[str]:
    """Why ``--device name`` cannot be used on this machine (None when it can): not a device name, no such
    accelerator, or an index past the last one."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return 'is not a device name (cpu, cuda, cuda:N, mps, ...).'
    if device.type == 'cpu':
        return None
    backend = getattr(torch, device.type, None)
    if device.type == 'mps':
        backend = getattr(torch.backends, 'mps', None)
    available = getattr(backend, 'is_available', lambda: False)()
    if not available:
        return (f'this machine has no {device.type} device (torch.{device.type}.is_available() is False); '
                'use --device cpu.')
    count = getattr(backend, 'device_count', lambda: 1)()
    if device.index is not None and device.index >= count:
        return f'this machine has {count} {device.type} device(s), numbered from 0.'
    return None


@dataclasses.dataclass
class DistInfo:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    owns_group: bool = False  # this call created the process group, so it should destroy it

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = '', backend: str = '') -> DistInfo:
    """One process, or DDP when launched by torchrun / SLURM (timm's ``init_distributed_device_so``).

    ``device`` defaults to ``cuda`` when available, else ``cpu``; the backend to nccl on CUDA, gloo on CPU.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(torch.device(device), rank, rank, world, world > 1)
    info = init_distributed_device_so(device=device, dist_backend=backend or None)
    return DistInfo(torch.device(info['device']), info['global_rank'], info['local_rank'], info['world_size'],
                    info['distributed'], owns_group=is_distributed_env() and info['distributed'])


def _reduce(value: torch.Tensor, op) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (the value itself in a single process)."""
    return _reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    return _reduce(value, dist.ReduceOp.MAX)


def autocast_for(device: torch.device, enabled: bool, dtype: str = '') -> Callable[[], Any]:
    """A context factory: ``torch.autocast`` (float16 on CUDA, bfloat16 elsewhere by default) or a no-op."""
    if not enabled:
        return contextlib.nullcontext
    name = dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    return functools.partial(torch.autocast, device_type=device.type, dtype=getattr(torch, name))
