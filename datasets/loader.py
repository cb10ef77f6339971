"""DataLoader construction for every dataset of this package, and the training sampler
that can start an epoch part-way (a resumed run's)."""
from itertools import islice
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset,
                              SequentialSampler)


class EpochSampler(DistributedSampler):
    """DistributedSampler's training order (shuffled from seed and epoch, this rank's share,
    drop-last), the same with one process as with several; `set_epoch(epoch, start)`
    begins the epoch after its first `start` indices of this rank, where a run that
    stopped part-way through it resumes."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside the epoch's {self.num_samples} indices")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def create_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool,
                  distributed: bool, seed: int = 0,
                  worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """Shuffled, drop-last batches when `train` (an `EpochSampler`: call
    `loader.sampler.set_epoch(epoch)` every epoch); the dataset's `collate_fn`.

    With `distributed`, the samplers split the data over the ranks of the initialised
    process group (evaluation: DistributedSampler, which repeats a few items to even out
    the ranks). Worker RNGs derive from `seed`; `worker_init_fn` runs in every worker
    (the training loop's leaves signals to the main process, engine/signals.py). An
    IterableDataset (tar shards) orders and splits its samples itself: no sampler.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        sampler = None
    elif train:
        sampler = EpochSampler(dataset, dist.get_world_size() if distributed else 1,
                               dist.get_rank() if distributed else 0, seed)
    elif distributed:
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=dataset.collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=False,
        generator=generator,
        worker_init_fn=worker_init_fn,
    )
