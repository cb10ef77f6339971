"""DataLoader construction for every dataset of this package."""
from typing import Callable, Optional

import torch
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset,
                              RandomSampler, SequentialSampler)


def create_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool,
                  distributed: bool, seed: int = 0,
                  worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """Shuffled, drop-last batches when `train`; the dataset's `collate_fn`.

    With `distributed`, a DistributedSampler over the initialised process group: call
    `loader.sampler.set_epoch(epoch)` every epoch. Worker RNGs derive from `seed`;
    `worker_init_fn` runs in every worker (the training loop's leaves signals to the main
    process, engine/signals.py). An IterableDataset (tar shards) orders and splits its
    samples itself: no sampler.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        sampler = None
    elif distributed:
        sampler = DistributedSampler(dataset, shuffle=train, drop_last=train, seed=seed)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
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
