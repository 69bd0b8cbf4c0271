"""finetune's checks from paths and metadata: each refused before a rank starts, naming its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_eaft.cli.main import main
from megatron_eaft.data.layout import write_metadata
from megatron_eaft.models import ModelMetadata
from megatron_eaft.models.checkpoint_dir import TRACKER_FILE
from megatron_eaft.train.config import ConfigError, config_from_dict
from megatron_eaft.train.model import tiny_qwen3_hf_config
from megatron_eaft.train.preflight import preflight


def fake_dataset(path: Path, vocab_size: int = 400) -> Path:
    path.mkdir(parents=True)
    write_metadata(
        path, {"seq_length": 32, "pad_token_id": 0, "packing": "pad", "vocab_size": vocab_size}
    )
    return path


def fake_converted(root: Path, tracker: str = "release") -> Path:
    root.mkdir(parents=True)
    ModelMetadata.for_hf_config(
        tiny_qwen3_hf_config(), dtype="fp32", transformer_impl="local"
    ).write(root)
    (root / "release").mkdir()
    (root / TRACKER_FILE).write_text(tracker)
    return root


def config(tmp_path: Path, **sections) -> dict:
    base = {
        "model": {"checkpoint": str(fake_converted(tmp_path / "base"))},
        "data": {"path": str(fake_dataset(tmp_path / "data"))},
        "train": {"iterations": 2},
        "checkpoint": {"save": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def refused(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        preflight(config_from_dict(data))
    return error.value


def test_a_good_configuration_passes(tmp_path):
    assert preflight(config_from_dict(config(tmp_path))).family == "qwen3"


def test_missing_or_foreign_data_is_refused(tmp_path):
    data = config(tmp_path, data={"path": str(tmp_path / "nowhere")})
    assert refused(data).key == "data.path"
    (tmp_path / "plain").mkdir()
    error = refused(config(tmp_path / "b", data={"path": str(tmp_path / "plain")}))
    assert error.key == "data.path" and "metadata.json" in str(error)
    general = {"sets": {"general": str(tmp_path / "plain")}}
    error = refused(config(tmp_path / "c", eval=general))
    assert error.key == "eval.sets.general" and "metadata.json" in str(error)


@pytest.mark.parametrize(
    ("tracker", "expected"), [("7", "iter_0000007 does not exist"), ("garbage", "'garbage'")]
)
def test_a_broken_model_checkpoint_is_refused(tmp_path, tracker, expected):
    data = config(tmp_path)
    (Path(data["model"]["checkpoint"]) / TRACKER_FILE).write_text(tracker)
    error = refused(data)
    assert error.key == "model.checkpoint" and expected in str(error)


def test_an_hf_directory_as_model_checkpoint_says_to_convert_it(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny_qwen3_hf_config()))
    error = refused(config(tmp_path, model={"checkpoint": str(hf)}))
    assert error.key == "model.checkpoint" and "convert import" in str(error)


def test_saving_into_a_converted_checkpoint_is_refused(tmp_path):
    data = config(tmp_path)
    error = refused({**data, "checkpoint": {"save": data["model"]["checkpoint"]}})
    assert error.key == "checkpoint.save"
    other = fake_converted(tmp_path / "other")
    error = refused({**data, "checkpoint": {"save": str(other)}})
    assert error.key == "checkpoint.save" and "release" in str(error)


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(tmp_path):
    error = refused(config(tmp_path, parallel={"tensor": 3}))
    assert error.key == "parallel.tensor" and "4 attention heads" in str(error)
    error = refused(config(tmp_path / "b", parallel={"expert": 2}))
    assert error.key == "parallel.expert" and "no experts" in str(error)


def test_data_of_a_larger_vocabulary_is_refused_unless_allowed(tmp_path):
    data = config(tmp_path)
    big = fake_dataset(tmp_path / "big", vocab_size=60000)
    error = refused({**data, "data": {"path": str(big)}})
    assert error.key == "data.path" and "60000" in str(error) and "512" in str(error)
    assert "data.allow_tokenizer_mismatch" in str(error)
    error = refused({**data, "eval": {"sets": {"general": str(big)}}})
    assert error.key == "eval.sets.general" and "60000" in str(error)
    allowed = {**data, "data": {"path": str(big), "allow_tokenizer_mismatch": True}}
    preflight(config_from_dict(allowed))


def test_the_cli_refuses_before_start_up_with_one_line_on_rank_zero(tmp_path, capsys, monkeypatch):
    data = config(tmp_path, parallel={"tensor": 3})
    args = [
        "finetune",
        f"model.checkpoint={data['model']['checkpoint']}",
        f"data.path={data['data']['path']}",
        "train.iterations=1",
        "parallel.tensor=3",
    ]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "parallel.tensor" in lines[0]
    # Under torchrun every rank checks; only rank 0 prints.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert main(args) == 2
    assert capsys.readouterr().err == ""


def test_fewer_key_value_heads_than_tensor_ranks_are_replicated_not_refused(tmp_path):
    from megatron_eaft.models import ParallelLayout, check_layout

    metadata = ModelMetadata.for_hf_config(
        tiny_qwen3_hf_config(num_key_value_heads=1), dtype="fp32", transformer_impl="local"
    )
    check_layout(metadata, ParallelLayout(tensor=2))
    check_layout(metadata, ParallelLayout(tensor=4))


def test_a_full_disk_during_training_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import errno

    from megatron_eaft.outputs import DiskFullError
    from megatron_eaft.train import trainer

    def full_disk(config):
        raise DiskFullError(
            f"no space left on device writing {tmp_path}/run",
            OSError(errno.ENOSPC, "No space left on device"),
        )

    monkeypatch.setattr(trainer, "main_worker", full_disk)
    data = config(tmp_path)
    args = [
        "finetune",
        f"model.checkpoint={data['model']['checkpoint']}",
        f"data.path={data['data']['path']}",
        "train.iterations=1",
    ]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"megatron-eaft finetune: error: no space left on device writing {tmp_path}/run"
    ]


def test_gated_delta_net_at_tp2_under_transformer_engine_needs_sequence_parallelism(tmp_path):
    from tests.qwen3_5 import qwen3_5_models

    hf_config = qwen3_5_models.text_config().to_dict()
    base = tmp_path / "qwen3_5"
    base.mkdir()
    ModelMetadata.for_hf_config(hf_config, dtype="fp32", transformer_impl="local").write(base)
    (base / "release").mkdir()
    (base / TRACKER_FILE).write_text("release")
    vocab = hf_config["vocab_size"]

    def run(name: str, **parallel) -> dict:
        data = fake_dataset(tmp_path / name, vocab_size=vocab)
        return config(
            tmp_path / f"{name}_run",
            model={"checkpoint": str(base), "transformer_impl": parallel.pop("impl")},
            data={"path": str(data)},
            parallel=parallel,
        )

    error = refused(run("te", impl="transformer_engine", tensor=2))
    assert error.key == "parallel.sequence_parallel" and "Gated-DeltaNet" in str(error)
    te_sp = run("te_sp", impl="transformer_engine", tensor=2, sequence_parallel=True)
    assert preflight(config_from_dict(te_sp)).family == "qwen3_5"
    # The local spec's output norm sums its gradient over TP itself.
    assert preflight(config_from_dict(run("local", impl="local", tensor=2))).family == "qwen3_5"


def test_uneven_pipeline_stages_follow_megatrons_rule(tmp_path):
    # The tiny Qwen3 has 4 layers: 3 stages cannot share them evenly, 1 + 3 / 3 + 1 can.
    error = refused(config(tmp_path / "a", parallel={"pipeline": 3}))
    assert error.key == "parallel.pipeline" and "first_stage_layers" in str(error)
    uneven = config(tmp_path / "b", parallel={"pipeline": 2, "first_stage_layers": 1})
    assert preflight(config_from_dict(uneven)).family == "qwen3"
    error = refused(config(tmp_path / "c", parallel={"pipeline": 3, "first_stage_layers": 1}))
    assert error.key == "parallel.first_stage_layers" and "leave 3 of the 4 layers" in str(error)
    both = {"pipeline": 3, "first_stage_layers": 1, "last_stage_layers": 1}
    assert preflight(config_from_dict(config(tmp_path / "d", parallel=both))).family == "qwen3"
    error = refused(config(tmp_path / "e", parallel={"pipeline": 2, "last_stage_layers": 4}))
    assert error.key == "parallel.last_stage_layers"
    with pytest.raises(ConfigError, match="needs pipeline > 1"):
        config_from_dict(config(tmp_path / "f", parallel={"first_stage_layers": 2}))
