"""`megatron-eaft demo --quick` end to end: every stage runs, checks hold, files are written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_eaft.cli.main import main
from megatron_eaft.demo import pipeline
from megatron_eaft.demo.pipeline import QUICK, DemoError, prepare_output_dir, run_demo

STAGES = (
    "data",
    "tokenizer",
    "pre-train (plain torch)",
    "convert import",
    "convert verify",
    "prepare-data (train)",
    "prepare-data (eval)",
    "prepare-data (general text)",
    "diagnose base model on the SFT data",
    "base model on the eval sets (no training)",
    "finetune (eaft, TP=2, gloo)",
    "finetune (sft, TP=2, gloo)",
    "convert export (eaft)",
    "convert export (sft)",
    "evaluate with transformers (generate)",
    "megatron-eaft evaluate (lm_eval, local tasks)",
    "plot training curves",
)


@pytest.fixture(scope="module")
def quick_demo(dist, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    lines: list[str] = []
    report = run_demo(out, QUICK, log=lines.append, pool=dist)
    return out, report, "\n".join(lines)


def test_every_stage_runs_and_is_timed(quick_demo):
    _, report, text = quick_demo
    assert tuple(report["stage_seconds"]) == STAGES
    assert all(seconds >= 0 for seconds in report["stage_seconds"].values())
    assert report["total_seconds"] >= sum(report["stage_seconds"].values())
    for line in (
        "conversion check",
        "confident conflicts",
        "training curves",
        "forgetting while learning",
        "the paper's table",
        "time per stage",
    ):
        assert line in text


def test_conversion_check_is_exact_at_tp2(quick_demo):
    conversion = quick_demo[1]["conversion"]
    assert conversion["tp"] == 2 and conversion["ok"]
    assert conversion["max_abs_diff"] < 1e-4
    assert conversion["top1_agreement"] == 1.0


def test_both_runs_trained_and_logged_finite_curves(quick_demo):
    out, report, _ = quick_demo
    for kind in ("eaft", "sft"):
        run = report["runs"][kind]
        assert run["iterations"] == QUICK.iterations
        for key in ("lm loss", "eaft loss", "eaft/confident_conflict_frac"):
            assert math.isfinite(run["last"][key]), (kind, key)
        config = (out / "runs" / kind / "config.yaml").read_text()
        assert "check_finite: true" in config and f"kind: {kind}" in config
        series = report["series"][kind]
        assert len(series["lm loss"]) == QUICK.iterations
        # Both eval sets at every evaluation, the general text from eval.sets.
        assert run["eval_sets"] and all(
            math.isfinite(point["domain"]) and math.isfinite(point["general"])
            for point in run["eval_sets"].values()
        )
        assert '"general/lm loss"' in (out / "runs" / kind / "metrics.jsonl").read_text()
    # Plain SFT weighs every token 1: its two losses coincide; EAFT's weights are < 1.
    sft, eaft = report["runs"]["sft"]["first"], report["runs"]["eaft"]["first"]
    assert sft["eaft loss"] == pytest.approx(sft["lm loss"])
    assert eaft["eaft loss"] < eaft["lm loss"]
    assert eaft["lm loss"] == pytest.approx(sft["lm loss"], rel=1e-5)  # same start, same data


def test_exported_models_load_and_differ_by_loss(quick_demo):
    from megatron_eaft.demo.evaluate import load_model

    out, report, _ = quick_demo
    weights = {}
    for label, path in (
        ("base", out / "base_hf"),
        ("eaft", out / "runs" / "eaft" / "hf"),
        ("sft", out / "runs" / "sft" / "hf"),
    ):
        model, tokenizer = load_model(path)
        assert tokenizer.chat_template
        weights[label] = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(weights["base"], weights["eaft"])
    assert not torch.equal(weights["eaft"], weights["sft"])
    assert set(report["benchmarks"]["results"]["models"]) == {"base", "eaft", "sft"}
    models = report["evaluation"]["models"]
    assert set(models) == {"base", "eaft", "sft"}
    for result in models.values():
        assert 0.0 <= result["domain_accuracy"] <= 1.0
        assert 0.0 <= result["seen_domain_accuracy"] <= 1.0
        assert math.isfinite(result["general_loss"]) and math.isfinite(result["domain_loss"])
        assert all(isinstance(answer, str) for answer in result["samples"].values())


def test_outputs_are_on_disk(quick_demo):
    out, report, _ = quick_demo
    assert json.loads((out / "report.json").read_text())["conversion"] == report["conversion"]
    assert "time per stage" in (out / "report.txt").read_text()
    for png in (
        out / "diagnostics" / "base_on_sft_data" / "entropy_probability.png",
        out / "diagnostics" / "base_on_sft_data" / "topk_vs_exact.png",
        out / "diagnostics" / "runs" / "training_curves.png",
    ):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    diagnostics = json.loads(
        (out / "diagnostics" / "base_on_sft_data" / "diagnostics.json").read_text()
    )
    assert diagnostics["statistics"]["tokens"] >= QUICK.diagnose_tokens
    assert diagnostics["layout"]["tp"] == 2


def test_output_dir_is_only_cleared_when_the_demo_wrote_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not written by the demo"):
        prepare_output_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    previous = tmp_path / "previous"
    prepare_output_dir(previous)
    (previous / "stale.txt").write_text("old run")
    prepare_output_dir(previous)
    assert not (previous / "stale.txt").exists()


def test_cli_flags_choose_the_settings(monkeypatch, tmp_path):
    seen = {}

    def fake_run_demo(out, settings, **kwargs):
        seen.update(out=out, settings=settings)
        return {}

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    assert main(["demo", "--quick", "--no-sft", "--out", str(tmp_path / "x")]) == 0
    assert seen["out"] == tmp_path / "x"
    assert seen["settings"].iterations == QUICK.iterations
    assert seen["settings"].compare_sft is False
    assert main(["demo"]) == 0
    assert seen["settings"] == pipeline.FULL and str(seen["out"]) == "demo_out"
