"""`diagnose model` and `convert verify` refuse, before any rank starts, what metadata shows."""

from __future__ import annotations

import json

import pytest

from megatron_eaft.cli.main import main
from megatron_eaft.train.model import tiny_qwen3_hf_config
from tests.train.test_preflight import fake_converted, fake_dataset


@pytest.fixture
def paths(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny_qwen3_hf_config()))
    return {
        "hf": hf,
        "megatron": fake_converted(tmp_path / "base"),
        "data": fake_dataset(tmp_path / "data"),
        "big_data": fake_dataset(tmp_path / "big", vocab_size=60000),
        "out": tmp_path / "out",
    }


def diagnose(paths, megatron, data, *extra):
    return main(
        [
            "diagnose",
            "model",
            "--megatron",
            str(megatron),
            "--data",
            str(data),
            "--out",
            str(paths["out"]),
            "--no-plots",
            *extra,
        ]
    )


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_diagnose_refuses_an_hf_directory(paths, capsys):
    assert diagnose(paths, paths["hf"], paths["data"]) == 1
    assert "HF model directory" in one_error_line(capsys)


def test_diagnose_refuses_a_tp_that_does_not_divide_the_heads(paths, capsys):
    assert diagnose(paths, paths["megatron"], paths["data"], "--tp", "3") == 1
    assert "does not divide the 4 attention heads" in one_error_line(capsys)


def test_diagnose_refuses_data_of_a_larger_vocabulary_unless_allowed(paths, capsys):
    assert diagnose(paths, paths["megatron"], paths["big_data"]) == 1
    line = one_error_line(capsys)
    assert "60000-token vocabulary" in line and "--allow-tokenizer-mismatch" in line
    from megatron_eaft.diagnostics.model_pass import check_inputs

    check_inputs(paths["megatron"], paths["big_data"], 1, 1, allow_tokenizer_mismatch=True)


def test_verify_refuses_a_tp_that_does_not_divide_the_heads(paths, capsys):
    args = ["convert", "verify", "--hf", str(paths["hf"]), "--megatron", str(paths["megatron"])]
    assert main([*args, "--tp", "3"]) == 1
    assert "does not divide the 4 attention heads" in one_error_line(capsys)
