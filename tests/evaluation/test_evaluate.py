"""`megatron-eaft evaluate` end to end on CPU: lm_eval's HF backend, a Megatron checkpoint
exported on the fly, the table, JSON and chart; and its input errors."""

from __future__ import annotations

import json
import sys

import pytest

from megatron_eaft.cli.main import main
from tests.evaluation.conftest import CAPITALS, prompt


def multiple_choice_accuracy(model_dir) -> float:
    """tiny_mc computed without lm_eval: the choice with the largest sum of log-probabilities
    of its tokens after the prompt (as lm_eval's `acc`), right or not."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    right = 0
    for question, choices, answer in CAPITALS:
        context = tokenizer(prompt(question))["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(f"{prompt(question)} {choice}")["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(
                sum(float(logits[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            )
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    return right / len(CAPITALS)


def test_base_and_exported_fine_tuned_model_table(
    tiny_eval_setup, tmp_path, capsys, one_torch_thread
):
    setup = tiny_eval_setup
    out = tmp_path / "out"
    arguments = [
        "evaluate",
        "--model", f"base={setup['base']}",
        "--model", f"tuned={setup['tuned']}",
        "--target-tasks", "tiny_mc",
        "--general-tasks", "tiny_gen",
        "--tasks", "tiny_group",
        "--include-path", str(setup["tasks"]),
        "--device", "cpu",
        "--dtype", "float32",
        "--batch-size", "4",
        "--out", str(out),
    ]  # fmt: skip
    assert main(arguments) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    base, tuned = results["models"]["base"], results["models"]["tuned"]
    assert (results["base"], base["kind"], tuned["kind"]) == ("base", "hf", "megatron")
    assert base["tasks"]["tiny_mc"]["metric"] == "acc,none"
    assert base["tasks"]["tiny_gen"]["metric"] == "exact_match,none"
    expected_base = 100 * multiple_choice_accuracy(setup["base"])
    assert base["scores"] == pytest.approx(
        {
            "tiny_mc": expected_base,
            "target avg": expected_base,
            "tiny_gen": 0.0,
            "general avg": 0.0,
            "tiny_group": expected_base,  # a group of the same documents: its aggregate
        }
    )
    # The fine-tuned model memorised both tasks.
    assert tuned["scores"] == pytest.approx(
        {key: 100.0 for key in ("tiny_mc", "target avg", "tiny_gen", "general avg", "tiny_group")}
    )
    assert tuned["change_vs_base"] == pytest.approx(
        {key: 100.0 - value for key, value in base["scores"].items()}
    )
    table = (out / "table.txt").read_text()
    assert [cell.strip() for cell in table.splitlines()[0].split(" | ")[1:]] == [
        "tiny_mc", "target avg", "tiny_gen", "general avg", "tiny_group"
    ]  # fmt: skip
    assert f"100.0 ({100.0 - expected_base:+.1f})" in table and "100.0 (+100.0)" in table
    assert table.splitlines()[0] in printed
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "lm_eval" / "tuned.json").read_text())
    assert raw["results"]["tiny_gen"]["exact_match,none"] == 1.0
    assert not list(out.glob(".export-*"))  # the exported HF directory is gone

    # Results are not replaced without --overwrite, and that is found before any scoring.
    assert main(arguments) == 2
    assert "already holds results.json" in capsys.readouterr().err


def test_input_errors_are_named_before_any_model_loads(tiny_eval_setup, tmp_path, capsys):
    setup = tiny_eval_setup
    common = ["evaluate", "--include-path", str(setup["tasks"]), "--out", str(tmp_path / "o")]
    cases = [
        (["--model", str(tmp_path), "--tasks", "tiny_mc"], "is neither an HF model directory"),
        (
            ["--model", f"tuned={setup['tuned']}", "--tasks", "tiny_mc"],
            "holds no tokenizer (fine-tuned checkpoints do not); give --tokenizer",
        ),
        (
            ["--model", f"b={setup['base']}", "--target-tasks", "tiny_mc", "--tasks", "tiny_mc"],
            "tiny_mc is listed twice",
        ),
        (
            ["--model", f"b={setup['base']}", "--tasks", "tiny_mc", "--metric", "tiny_gen=acc"],
            "--metric for tiny_gen",
        ),
        (["--model", f"b={setup['base']}", "--tasks", "x.yaml"], "task file x.yaml does not exist"),
    ]
    for arguments, message in cases:
        assert main([*common, *arguments]) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_lm_eval_says_which_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert main(["evaluate", "--model", str(tmp_path), "--tasks", "mmlu"]) == 2
    assert "pip install 'megatron-eaft[eval]'" in capsys.readouterr().err
