"""The task registry: each task's settings (the schema is their composition), model and
dataset builders, training losses, evaluation protocol and output files, bundled in a
`Task` (engine/task.py). The scripts, `testa.load`, the config reference and the run's
output folder checks all read `TASKS`.

- `retrieval`: VTC + VTM fine-tuning; ITM re-ranking of the top-k candidates, R@K.
- `videoqa`: weighted answer NLL; answer ranking or generation, accuracy.
- `pretraining`: VTC + VTM + captioning with warmup and the step/cosine schedule.
"""
from typing import Dict

from engine.task import Task
from tasks import pretraining, retrieval, videoqa

TASKS: Dict[str, Task] = {task.name: task for task in (retrieval.TASK, videoqa.TASK,
                                                        pretraining.TASK)}


def task_of_dataset(dataset: str) -> Task:
    """The task whose `dataset` setting accepts `dataset` (configs, and checkpoints that
    record no task, name only their dataset)."""
    for task in TASKS.values():
        if dataset in task.schema["dataset"].choices:
            return task
    raise ValueError(f"no task reads the dataset {dataset!r}; known: "
                     + ", ".join(name for task in TASKS.values()
                                 for name in task.schema["dataset"].choices))
