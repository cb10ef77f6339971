"""DataLoader construction for every dataset of this package."""
import signal

import torch
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset,
                              RandomSampler, SequentialSampler)


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores SIGINT and SIGTERM: Ctrl-C and schedulers signal the whole process
    group, and the main process, which handles them (engine/run.py), shuts the workers
    down; a worker left with the main process's handler would die with a traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def create_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool,
                  distributed: bool, seed: int = 0) -> DataLoader:
    """Shuffled, drop-last batches when `train`; the dataset's `collate_fn`.

    With `distributed`, a DistributedSampler over the initialised process group: call
    `loader.sampler.set_epoch(epoch)` every epoch. Worker RNGs derive from `seed`. An
    IterableDataset (tar shards) orders and splits its samples itself: no sampler.
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
        worker_init_fn=leave_signals_to_the_main_process,
    )
