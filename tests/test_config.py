"""Config validation: the shipped configs pass their script's schema; misspelled,
missing, mistyped and out-of-range keys are reported with the file (or `--opts`) and the
key; `--opts` values are read as YAML."""
from pathlib import Path

import pytest
from ruamel.yaml import YAML

import train_retrieval
from engine.config import format_opts, parse_opts, resolve_config
from tasks.pretraining import PRETRAIN_SCHEMA
from tasks.retrieval import RETRIEVAL_SCHEMA
from tasks.videoqa import VIDEOQA_SCHEMA
from utils import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {"retrieval": RETRIEVAL_SCHEMA, "vqa": VIDEOQA_SCHEMA, "videoqa": VIDEOQA_SCHEMA,
           "pretrain": PRETRAIN_SCHEMA}


def write_config(path: Path, **changes) -> str:
    """configs/retrieval_queryd_f32.yaml with `changes` (None removes a key) at `path`."""
    config = YAML(typ="safe").load((CONFIGS / "retrieval_queryd_f32.yaml").read_text())
    for name, value in changes.items():
        if value is None:
            config.pop(name)
        else:
            config[name] = value
    YAML(typ="safe").dump(config, path)
    return str(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass_their_schema(path):
    parts = path.stem.split("_")
    schema = SCHEMAS[parts[1] if parts[0] == "demo" else parts[0]]  # demo_retrieval.yaml
    config = resolve_config(str(path), [], schema)
    assert set(config) == set(schema)


def test_defaults_fill_optional_keys(tmp_path):
    config = resolve_config(write_config(tmp_path / "c.yaml"), [], RETRIEVAL_SCHEMA)
    assert config["seed"] == 42 and config["accum_steps"] == 1 and config["amp"] == "bf16"
    assert config["k_test_batch_size"] == 64 and config["text_config"] is None


def test_misspelled_key_names_file_and_suggestion(tmp_path):
    path = write_config(tmp_path / "x.yaml", max_epochs=10)
    with pytest.raises(ConfigError) as err:
        resolve_config(path, [], RETRIEVAL_SCHEMA)
    assert str(err.value) == f"{path}: unknown key 'max_epochs' (did you mean 'max_epoch'?)"


def test_missing_required_key_names_file(tmp_path):
    path = write_config(tmp_path / "x.yaml", ann_root=None)
    with pytest.raises(ConfigError, match=r"x\.yaml: missing required key 'ann_root'$"):
        resolve_config(path, [], RETRIEVAL_SCHEMA)


def test_wrong_type_and_bad_choice(tmp_path):
    path = write_config(tmp_path / "x.yaml", max_epoch="ten")
    with pytest.raises(ConfigError, match=r"x\.yaml: max_epoch must be int, got 'ten'"):
        resolve_config(path, [], RETRIEVAL_SCHEMA)
    bad_choice = r"--opts: amp must be one of bf16, fp16, none, got 'fp8'"
    with pytest.raises(ConfigError, match=bad_choice):
        resolve_config(write_config(tmp_path / "y.yaml"), ["amp=fp8"], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match="token_merging must be bool, got 1"):
        resolve_config(write_config(tmp_path / "z.yaml", token_merging=1), [], RETRIEVAL_SCHEMA)


@pytest.mark.parametrize("text_config, problem", [
    ("{initializer_range: -0.1}", "initializer_range must be >= 0, got -0.1"),
    ("{initializer_range: x}", "initializer_range must be int or float, got 'x'"),
    ("{hidden_dropout_prob: 1.5}", "hidden_dropout_prob must be 0 to 1, got 1.5"),
    ("{hidden_sizee: 128}", "unknown key 'hidden_sizee' (did you mean 'hidden_size'?)"),
    ("{hidden_size: 100, num_attention_heads: 3}",
     "hidden_size 100 is not divisible by num_attention_heads 3"),
])
def test_text_config_entries_are_checked_before_building(tmp_path, text_config, problem):
    with pytest.raises(ConfigError) as error:
        resolve_config(write_config(tmp_path / "t.yaml"), [f"text_config={text_config}"],
                       RETRIEVAL_SCHEMA)
    assert str(error.value) == f"--opts: text_config: {problem}"


def test_opts_are_yaml_values():
    opts = ["max_epoch=2", "testa_r=[1,12]", "init_lr=1e-4", "amp=none", "pretrained=null",
            "text_config={hidden_size: 64}", "vit_grad_ckpt=True"]
    assert parse_opts(opts) == {
        "max_epoch": 2, "testa_r": [1, 12], "init_lr": 1e-4, "amp": "none", "pretrained": None,
        "text_config": {"hidden_size": 64}, "vit_grad_ckpt": True}


def test_opts_override_the_file_and_are_validated(tmp_path):
    path = write_config(tmp_path / "c.yaml")
    config = resolve_config(path, ["max_epoch=2", "testa_r=[1,12]"], RETRIEVAL_SCHEMA)
    assert config["max_epoch"] == 2 and config["testa_r"] == [1, 12]
    unknown = r"^--opts: unknown key 'k_tests' \(did you mean 'k_test'\?\)$"
    with pytest.raises(ConfigError, match=unknown):
        resolve_config(path, ["k_tests=3"], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match="^--opts: expected key=value, got 'max_epoch'$"):
        resolve_config(path, ["max_epoch"], RETRIEVAL_SCHEMA)


def test_cache_clips_needs_the_main_process(tmp_path):
    path = write_config(tmp_path / "x.yaml", cache_clips=True)
    with pytest.raises(ConfigError, match=r"x\.yaml: cache_clips keeps the decoded clips in the main "
                                          r"process; it needs num_workers: 0$"):
        resolve_config(path, ["num_workers=2"], RETRIEVAL_SCHEMA)
    assert resolve_config(path, ["num_workers=0"], RETRIEVAL_SCHEMA)["cache_clips"] is True


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(str(tmp_path / "absent.yaml"), [], RETRIEVAL_SCHEMA)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_config(str(tmp_path / "list.yaml"), [], RETRIEVAL_SCHEMA)


def test_script_exits_with_one_line_error(tmp_path):
    path = write_config(tmp_path / "x.yaml", weight_decy=0.05)
    with pytest.raises(SystemExit) as exit_info:
        train_retrieval.main(["--config", path, "--output_dir", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message == f"error: {path}: unknown key 'weight_decy' (did you mean 'weight_decay'?)"
    assert "\n" not in message


def test_out_of_range_values_name_the_file_and_the_bound(tmp_path):
    path = write_config(tmp_path / "x.yaml", batch_size_train=0)
    with pytest.raises(ConfigError, match=r"x\.yaml: batch_size_train must be >= 1, got 0$"):
        resolve_config(path, [], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match=r"^--opts: init_lr must be >= 0, got -0\.1$"):
        resolve_config(write_config(tmp_path / "y.yaml"), ["init_lr=-0.1"], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match=r"^--opts: momentum must be 0 to 1, got 1\.5$"):
        resolve_config(write_config(tmp_path / "z.yaml"), ["momentum=1.5"], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match=r"^--opts: aggregation must be one of geometry, "
                                          r"importance, prune, got 'random'$"):
        resolve_config(write_config(tmp_path / "w.yaml"), ["aggregation=random"], RETRIEVAL_SCHEMA)


def test_builders_fill_defaults_of_a_paper_config():
    """A config without project-only keys (here max_question_len) still builds, with the
    declared defaults; a missing required key is named."""
    from datasets.base import FINETUNE_DATA_SETTINGS
    from utils import QUESTION_SETTINGS
    from utils import with_defaults
    paper = {"video_root": "v", "ann_root": "a", "num_frm_train": 8, "num_frm_test": 8}
    filled = with_defaults(paper, {**FINETUNE_DATA_SETTINGS, **QUESTION_SETTINGS})
    assert filled["max_question_len"] == 35 and filled["frm_sampling_strategy"] == "uniform"
    assert filled["cache_clips"] is False and filled["video_root"] == "v"
    with pytest.raises(ConfigError, match=r"^config: missing required key 'ann_root'$"):
        with_defaults({k: v for k, v in paper.items() if k != "ann_root"}, FINETUNE_DATA_SETTINGS)
    with pytest.raises(ConfigError, match=r"^config: num_frm_test must be >= 1, got 0$"):
        with_defaults(dict(paper, num_frm_test=0), FINETUNE_DATA_SETTINGS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    """NaN compares false with both bounds, so a plain range check would let it through."""
    path = write_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match=r"^--opts: init_lr must be a finite number, got "):
        resolve_config(path, [f"init_lr={value}"], RETRIEVAL_SCHEMA)
    with pytest.raises(ConfigError, match=r"^--opts: text_config: initializer_range must be a "
                                          r"finite number"):
        resolve_config(path, [f"text_config={{initializer_range: {value}}}"], RETRIEVAL_SCHEMA)


def test_a_key_given_twice_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--opts: max_epoch is given twice$"):
        parse_opts(["max_epoch=2", "max_epoch=3"])
    path = tmp_path / "twice.yaml"
    path.write_text(Path(write_config(tmp_path / "x.yaml")).read_text() + "max_epoch: 99\n")
    with pytest.raises(ConfigError, match=r'twice\.yaml: not valid YAML \(found duplicate key '
                                          r'"max_epoch" with value "99" \(original value: "\d+"\), '
                                          r'line \d+\)$'):
        resolve_config(str(path), [], RETRIEVAL_SCHEMA)


def test_formatted_opts_read_back_as_the_values():
    values = {"video_root": "data/my videos: new", "testa_r": [1, 12], "text_guided_k": None,
              "init_lr": 2e-4, "text_config": {"hidden_size": 60}, "augment": False}
    assert parse_opts(format_opts(values)) == values
