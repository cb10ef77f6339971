"""The task registry (tasks.TASKS): every registered task resolves to a schema, builders,
an entry script and an API wrapper; checkpoints record their task and `testa.load`
follows the record (older files without it: the task of their config's dataset)."""
import importlib
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

import testa
from engine.saving import model_checkpoint, save_checkpoint
from tasks import DATASETS, TASKS, task_of_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_resolves(name, tiny_config):
    task = TASKS[name]
    assert task.name == name
    script = importlib.import_module(Path(task.script).stem)
    assert script.TASK is task  # the entry script runs the registered task
    choices = task.schema["dataset"].choices
    assert choices and tuple(choices) == tuple(task.datasets)  # every choice has its builder
    assert all(task_of_dataset(dataset) is task for dataset in choices)
    assert task.served_as in testa.SERVED_AS
    assert callable(task.make_losses) and callable(task.schedule)
    assert (task.evaluate is None) == (task.best_metric is None)
    model = task.build_model(tiny_config())
    assert isinstance(model, torch.nn.Module) and isinstance(model.kind, str)


def test_every_dataset_has_one_task():
    owners = {dataset: [name for name, task in TASKS.items()
                        if dataset in task.schema["dataset"].choices]
              for dataset in DATASETS}
    assert all(len(names) == 1 for names in owners.values()), owners
    assert all(DATASETS[dataset].name == names[0] for dataset, names in owners.items())
    with pytest.raises(ValueError, match="no task reads the dataset 'retrieval_msrvtt'"):
        task_of_dataset("retrieval_msrvtt")


def videoqa_config() -> dict:
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / "demo_videoqa.yaml").read_text())
    config.update(image_size=32, num_frames=4, num_frm_train=4, num_frm_test=4, vision_width=64,
                  num_heads=2, depth=2, testa_r=[1, 1], k_test=4,
                  text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128))
    return config


def test_load_picks_the_task_a_checkpoint_records(tmp_path):
    """A VideoQA checkpoint whose config names a retrieval dataset still loads as VideoQA:
    the task comes from the record, not from the dataset name."""
    torch.manual_seed(0)
    config = videoqa_config()
    model = TASKS["videoqa"].build_model(config)
    recorded = tmp_path / "recorded.pth"
    save_checkpoint(str(recorded), model_checkpoint(
        model, dict(config, dataset="retrieval_activitynet"), epoch=0, task="videoqa"))
    loaded = testa.load(recorded)
    assert isinstance(loaded, testa.VideoQA)
    assert not loaded.load_report.needs_attention() and loaded.load_report.missing == []

    older = tmp_path / "older.pth"  # written before checkpoints recorded their task
    checkpoint = model_checkpoint(model, config, epoch=0)
    del checkpoint["task"]
    save_checkpoint(str(older), checkpoint)
    assert isinstance(testa.load(older), testa.VideoQA)


def test_load_refuses_a_checkpoint_with_neither_task_nor_dataset(tmp_path):
    config = videoqa_config()
    del config["dataset"]
    path = tmp_path / "bare.pth"
    save_checkpoint(str(path), model_checkpoint(torch.nn.Linear(2, 2), config, epoch=0))
    with pytest.raises(ValueError, match="records no task and its config names no dataset"):
        testa.load(path)
