"""The task registry: each task's settings (the schema is their composition), model and
dataset builders, training losses, evaluation protocol and output files, bundled in a
`Task` (engine/task.py). The scripts, `testa.load`, the config reference and the run's
output folder checks all read `TASKS`.

- `retrieval`: VTC + VTM fine-tuning; ITM re-ranking of the top-k candidates, R@K.
- `videoqa`: weighted answer NLL; answer ranking or generation, accuracy.
- `pretraining`: VTC + VTM + captioning with warmup and the step/cosine schedule.
"""
from typing import Dict, Mapping, Sequence

from datasets import SPLITS, Splits
from engine.task import Task
from tasks import pretraining, retrieval, videoqa

TASKS: Dict[str, Task] = {task.name: task for task in (retrieval.TASK, videoqa.TASK,
                                                        pretraining.TASK)}


def _owners(tasks: Mapping[str, Task]) -> Dict[str, Task]:
    """dataset name -> the task that reads it; a name two tasks claim is an error."""
    owners: Dict[str, Task] = {}
    for task in tasks.values():
        for dataset in task.datasets:
            if dataset in owners:
                raise ValueError(f"the dataset {dataset!r} belongs to two tasks: "
                                 f"{owners[dataset].name} and {task.name}")
            owners[dataset] = task
    return owners


DATASETS: Dict[str, Task] = _owners(TASKS)  # dataset name -> its task


def task_of_dataset(dataset: str) -> Task:
    """The task whose `dataset` setting accepts `dataset` (configs, and checkpoints that
    record no task, name only their dataset)."""
    if dataset not in DATASETS:
        raise ValueError(f"no task reads the dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def build_datasets(config: Mapping, splits: Sequence[str] = SPLITS) -> Splits:
    """(train, val, test) datasets of `config["dataset"]`, by the task that reads it
    (`Task.build_datasets`)."""
    return task_of_dataset(config["dataset"]).build_datasets(config, splits)
