"""What makes a resumed run continue exactly: a data order and augmentation that can start at any step,
and the random generators' states.

* The sample order of an epoch depends only on ``(seed, epoch)`` (:class:`ResumableSampler`, torch's
  ``DistributedSampler`` logic, also for one process), and an epoch can start part-way: the
  samples before the saved position are not loaded at all.
* Each sample's augmentation draws from generators seeded by ``(seed, epoch, sample index)``
  (:class:`EpochSeeded`): the same in any process, DataLoader worker or position in the epoch, so a
  resume with ``--workers`` > 0 repeats the same crops, flips and colour jitter.
* Everything else random (dropout, drop-path, mixup/cutmix, random erasing on the GPU) draws from
  each process's global generators, whose states are saved per rank (:func:`capture_rng`).
"""
import itertools
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

__all__ = ['EpochSeeded', 'ResumableSampler', 'resumable_loader', 'capture_rng', 'restore_rng', 'scheduler_state',
           'load_scheduler_state', 'gather', 'broadcast']


class EpochSeeded(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each sample's transform runs with Python's, NumPy's and
    torch's CPU generators seeded from ``(seed, epoch, index)``. In the main process (``--workers 0``) the
    generator states are put back afterwards (dropout, mixup and the rest draw from them); a worker process
    skips that (~0.2 ms a sample)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def transform(self):  # timm's create_loader sets the transform on the data set it is given
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        if get_worker_info() is not None:  # a worker process: nothing else draws from its generators
            self._seed(sample_seed)
            return self.dataset[index]
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()  # ~0.2 ms, main process only
        try:
            self._seed(sample_seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reset CUDA too


class ResumableSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (shuffled by ``seed + epoch``) for any number of processes, yielding
    ``(epoch, index)`` for :class:`EpochSeeded`. ``skip`` samples of this process's share are left out of
    the next pass only (a run resumed part-way through an epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(super().__iter__(), skip, None))


def resumable_loader(loader, seed: int, num_replicas: int, rank: int):
    """Rebuild the DataLoader of timm's ``create_loader`` (kept: transform, collate, workers, prefetcher)
    around :class:`EpochSeeded` and a :class:`ResumableSampler`; returns ``(loader, sampler)``.

    The loader gets its own ``generator``, so starting an epoch draws nothing from the global one. A
    streamed data set (``IterableDataset``, e.g. webdataset shards) has no order to position: its loader comes
    back unchanged, with ``None`` for the sampler.
    """
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    if isinstance(inner.dataset, IterableDataset):
        return loader, None
    dataset = EpochSeeded(inner.dataset, seed)
    sampler = ResumableSampler(dataset, num_replicas, rank, seed)
    rebuilt = DataLoader(
        dataset, batch_size=inner.batch_size, sampler=sampler, num_workers=inner.num_workers,
        collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, drop_last=inner.drop_last,
        worker_init_fn=inner.worker_init_fn, persistent_workers=inner.persistent_workers,
        generator=torch.Generator().manual_seed(seed))
    if isinstance(loader, PrefetchLoader):
        loader.loader = rebuilt
        return loader, sampler
    return rebuilt, sampler


def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process's global generator states, as plain values and tensors (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), random=random.getstate(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), gauss=float(gauss)))
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    version, internal, gauss_next = state['random']
    random.setstate((version, tuple(internal), gauss_next))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def scheduler_state(scheduler) -> Dict[str, Any]:
    """A timm scheduler's state; for the plateau schedule also its torch ``ReduceLROnPlateau``'s (timm keeps only
    ``best`` and ``last_epoch``, losing the patience and cooldown counters)."""
    state = scheduler.state_dict()
    if hasattr(scheduler, 'lr_scheduler'):
        state = dict(scheduler.lr_scheduler.state_dict(), **state)
    return state


def load_scheduler_state(scheduler, state: Dict[str, Any]) -> None:
    """Restore what the options and the step do not determine: the plateau schedule's metric history (its torch
    ``ReduceLROnPlateau``). Every other part of a timm scheduler is rebuilt from the options, so a resume with a
    new ``--epochs`` follows a schedule of the new length."""
    if hasattr(scheduler, 'lr_scheduler'):
        scheduler.lr_scheduler.load_state_dict({k: v for k, v in state.items()
                                                if k in scheduler.lr_scheduler.state_dict()})


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(obj: Any) -> List[Any]:
    """``obj`` of every process, indexed by rank (``[obj]`` in a single process)."""
    if not _distributed():
        return [obj]
    out: List[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
