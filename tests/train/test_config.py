"""The finetune YAML schema: loading, overrides, and errors that name the key."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron_eaft.cli.main import build_parser, main
from megatron_eaft.train.config import (
    KEY_HELP,
    ConfigError,
    all_keys,
    config_from_dict,
    load_config,
)

MINIMAL = {"model": {"preset": "tiny-qwen3"}, "train": {"iterations": 5}}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_are_the_papers_setting():
    config = config_from_dict(MINIMAL)
    assert config.optimizer.lr == 1e-5
    assert config.optimizer.warmup_fraction == 0.03
    assert config.optimizer.decay_style == "cosine"
    assert config.eaft.kind == "eaft" and config.eaft.topk == 20
    assert config.optimizer.warmup_steps(1000) == 30


def test_yaml_file_with_overrides_and_relative_paths(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        """
        model: {checkpoint: ckpt/qwen3}
        data: {path: data/train, global_batch_size: 8}
        train: {epochs: 2}
        optimizer: {lr: 1e-5}   # PyYAML reads this as a string; the schema makes it a float
        eaft: {kind: eaft, alpha: 2}
        checkpoint: {save: out}
        """,
    )
    config = load_config(path, ["optimizer.lr=2e-5", "eaft.topk=10", "checkpoint.save=null"])
    assert config.model.checkpoint == str(tmp_path / "ckpt/qwen3")
    assert config.data.path == str(tmp_path / "data/train")
    assert config.optimizer.lr == 2e-5 and isinstance(config.optimizer.lr, float)
    assert config.eaft.alpha == 2.0 and config.eaft.topk == 10
    assert config.checkpoint.save is None
    assert config.train.total_iterations(dataset_rows=20, global_batch_size=8) == 5


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["optimizer.lrr=1"], "optimizer.lrr", "unknown key"),
        (["parallel.tensor=two"], "parallel.tensor", "expected int"),
        (["parallel.tensor=0"], "parallel.tensor", ">= 1"),
        (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
        (["optimizer.min_lr=1"], "optimizer.min_lr", "optimizer.lr"),
        (["optimizer.decay_style=step"], "optimizer.decay_style", "cosine"),
        (["eaft.topk=1"], "eaft.topk", ">= 2"),
        (["eaft.kind=focal"], "eaft.kind", "sft"),
        (["eaft.unknown=1"], "eaft.unknown", "unknown key"),
        (["data.micro_batch_size=0"], "data.micro_batch_size", ">= 1"),
        (["train.epochs=3"], "train.iterations", "exactly one"),
        (["model.checkpoint=/x"], "model.checkpoint", "exactly one"),
        (["model.preset=huge"], "model.preset", "tiny-qwen3"),
        (["checkpoint.save_interval=10"], "checkpoint.save_interval", "checkpoint.save"),
        (["eval.interval=5"], "eval.interval", "data.eval_path or eval.sets"),
        (["eval.sets={general: /g, a b: /x}"], "eval.sets.a b", "letters, digits"),
        (["eval.sets.eaft=/x"], "eval.sets.eaft", "not eaft"),
        (["eval.sets=[/x]"], "eval.sets", "expected a mapping"),
        (["eval.sets.general=3"], "eval.sets.general", "expected str"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "tensor"),
        (["optimizer=3"], "optimizer", "mapping"),
        (["lr"], "lr", "section.key=value"),
    ],
)
def test_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(MINIMAL, overrides)
    assert info.value.key == key
    assert key in str(info.value) and words in str(info.value)


def test_named_evaluation_sets_next_to_the_eval_path_shorthand(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        """
        model: {preset: tiny-qwen3}
        data: {path: data/train, eval_path: data/domain_eval}
        train: {iterations: 5}
        eval: {interval: 5, sets: {general: data/general}}
        """,
    )
    config = load_config(path, ["eval.sets.code=/data/code"])
    assert config.eval_sets() == {
        "": str(tmp_path / "data/domain_eval"),
        "general": str(tmp_path / "data/general"),
        "code": "/data/code",
    }
    only_sets = config_from_dict(MINIMAL, ["eval.interval=2", "eval.sets.general=/g"])
    assert only_sets.eval_sets() == {"general": "/g"}


def test_wandb_needs_a_project_and_its_package(monkeypatch):
    config = config_from_dict(MINIMAL, ["logging.wandb_project=p", "logging.wandb_offline=true"])
    assert (config.logging.wandb_project, config.logging.wandb_offline) == ("p", True)
    with pytest.raises(ConfigError, match=r"^logging\.wandb_entity: needs logging\.wandb_project"):
        config_from_dict(MINIMAL, ["logging.wandb_entity=team"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        config_from_dict(MINIMAL, ["logging.wandb_project=p"])
    assert str(info.value) == (
        "logging.wandb_project: needs the wandb package: pip install 'megatron-eaft[wandb]'"
    )


def test_missing_sections_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        config_from_dict({"train": {"iterations": 1}})
    with pytest.raises(ConfigError, match=r"train\.iterations"):
        config_from_dict({"model": {"preset": "tiny-qwen3"}})


def test_layout_errors_name_the_key():
    config = config_from_dict(MINIMAL, ["parallel.tensor=2", "data.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"^parallel: world size 3"):
        config.parallel.data_parallel_size(3)
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: 6 is not a multiple"):
        config.data.num_microbatches(4)
    assert config.data.num_microbatches(2) == 3


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "model:\n  preset: tiny-qwen3\n  dtype: [fp32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+"):
        load_config(path)


def test_file_errors_name_the_file(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml", "model: {preset: tiny-qwen3}\ntrain: {iterations: x}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: train.iterations:")


def test_every_key_is_documented_in_help(capsys):
    keys = all_keys()
    assert set(keys) == set(KEY_HELP), set(keys) ^ set(KEY_HELP)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = capsys.readouterr().out
    for key in keys:
        section, name = key.split(".")
        assert f"\n  {name}: " in "\n" + text.split(f"\n{section}:\n", 1)[1], key
        assert KEY_HELP[key] in text


def test_cli_reports_config_errors_and_prints_resolved_config(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "run.yaml", "model: {preset: tiny-qwen3}\ntrain: {iterations: 2}\n"
    )
    assert main(["finetune", "--config", str(path), "--set", "optimizer.lrr=1"]) == 2
    assert "optimizer.lrr: unknown key" in capsys.readouterr().err
    assert main(["finetune", "--config", str(path), "eaft.kind=sft", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["eaft"]["kind"] == "sft" and printed["train"]["iterations"] == 2
