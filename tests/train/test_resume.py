"""The pieces of exact resume (:mod:`epsanet.train.resume`): data order, per-sample augmentation seeds,
generator and scheduler states."""
import dataclasses
import random

import numpy as np
import pytest
import torch
from timm.data import create_loader
from timm.data.loader import PrefetchLoader
from timm.scheduler import create_scheduler_v2
from torch.utils.data import Dataset

from epsanet.data import ImageFolder, write_image_folder
from epsanet.train import TrainConfig
from epsanet.train.resume import (
    EpochSeeded,
    ResumableSampler,
    capture_rng,
    load_scheduler_state,
    restore_rng,
    resumable_loader,
    scheduler_state,
)


def test_sampler_order_depends_on_seed_and_epoch_and_can_start_part_way():
    sampler = ResumableSampler(range(10), num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert {e for e, _ in full} == {2} and sorted(i for _, i in full) == list(range(10))
    sampler.skip = 4
    assert list(sampler) == full[4:]  # the rest of the same order, nothing loaded for the skipped samples
    assert list(sampler) == full  # the skip applies to one pass only
    sampler.set_epoch(3)
    assert [i for _, i in sampler] != [i for _, i in full]
    ranks = [list(ResumableSampler(range(10), 2, r, seed=3)) for r in (0, 1)]
    assert sorted(i for part in ranks for _, i in part) == list(range(10))


class _Draws(Dataset):
    transform = None

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_each_sample_draws_from_its_own_seeds():
    ds = EpochSeeded(_Draws(), seed=1)
    first = ds[(0, 3)]
    torch.manual_seed(123), random.seed(5), np.random.seed(7)  # whatever the process did before
    assert ds[(0, 3)] == first
    assert ds[(1, 3)] != first and ds[(0, 4)] != first and EpochSeeded(_Draws(), seed=2)[(0, 3)] != first
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ds[(0, 5)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]  # left untouched
    assert np.array_equal(np.random.get_state()[1], before[2])
    ds.transform = str
    assert ds.dataset.transform is str  # timm's create_loader sets the transform through the wrapper


def test_generator_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    np.random.randn()  # a cached gaussian is part of NumPy's state
    torch.save(capture_rng(torch.device('cpu')), tmp_path / 'rng.pth')
    draws = random.random(), np.random.randn(), torch.rand(3)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / 'rng.pth', weights_only=True), torch.device('cpu'))
    again = random.random(), np.random.randn(), torch.rand(3)
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


@pytest.mark.filterwarnings('ignore:PlateauLRScheduler is deprecated:FutureWarning')
@pytest.mark.parametrize('sched', [s for s in dict((f.name, f) for f in dataclasses.fields(TrainConfig))['sched']
                                   .metadata['choices'] if s != 'none'])
def test_every_schedule_saves_and_restores_its_state(sched, tmp_path):
    def make():
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        return opt, create_scheduler_v2(opt, sched=sched, num_epochs=6, warmup_epochs=1, patience_epochs=1)[0]

    opt, scheduler = make()
    for epoch in range(1, 4):
        scheduler.step(epoch, metric=1.0)  # a plateau: the patience counter moves
    torch.save(scheduler_state(scheduler), tmp_path / 's.pth')
    opt2, resumed = make()
    opt2.load_state_dict(opt.state_dict())
    load_scheduler_state(resumed, torch.load(tmp_path / 's.pth', weights_only=True))
    for epoch in range(4, 7):
        scheduler.step(epoch, metric=1.0)
        resumed.step(epoch, metric=1.0)
        assert opt2.param_groups[0]['lr'] == opt.param_groups[0]['lr'], epoch


@pytest.mark.parametrize('prefetcher', [False, True])
def test_a_pass_started_part_way_yields_the_same_later_batches_with_workers(prefetcher, tmp_path):
    # random-resized crops, flips and colour jitter in 2 worker processes: the batches after the skipped
    # ones are identical, so a resume with --workers > 0 repeats the data exactly
    root = write_image_folder(tmp_path, classes=('a', 'b', 'c'), splits={'train': 4})
    timm_loader = create_loader(ImageFolder(root / 'train'), input_size=(3, 32, 32), batch_size=4, is_training=True,
                                num_workers=2, persistent_workers=False, use_prefetcher=prefetcher,
                                device=torch.device('cpu'))
    loader, sampler = resumable_loader(timm_loader, seed=3, num_replicas=1, rank=0)
    assert isinstance(loader, PrefetchLoader) == prefetcher and len(loader) == 3

    def images(skip):
        sampler.set_epoch(1)
        sampler.skip = skip
        return [x for x, _ in loader]

    full, resumed = images(0), images(4)
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(full[1:], resumed))
    assert not torch.equal(full[0], full[1])
