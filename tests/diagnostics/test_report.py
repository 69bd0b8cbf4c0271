"""Report files from synthetic statistics: JSON schema, PNG figures, run logs, the `run` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_eaft.cli.main import main
from megatron_eaft.diagnostics import report as reporting
from megatron_eaft.diagnostics.run_logs import (
    RunLogError,
    read_metrics_jsonl,
    read_run_log,
    read_tensorboard,
)
from megatron_eaft.diagnostics.statistics import EntropyAgreement, TokenHistogram
from megatron_eaft.ops import EAFTConfig


def _synthetic_result() -> dict:
    generator = torch.Generator().manual_seed(0)
    entropy = torch.rand(500, generator=generator) ** 3
    prob = torch.rand(500, generator=generator)
    histogram = TokenHistogram(EAFTConfig(), 50, 50)
    histogram.update(entropy, prob, -torch.log(prob))
    agreement = EntropyAgreement(math.log(20))
    exact = entropy * math.log(20) * 1.2
    agreement.update(torch.clamp(exact * 0.95, max=math.log(20)), exact)
    return {
        "checkpoint": "ckpt",
        "data": "data",
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "rows": 3,
        "dataset_rows": 3,
        "seq_length": 64,
        "eaft_config": EAFTConfig().to_dict(),
        "statistics": histogram.to_dict(),
        "topk_vs_exact": {"k": 20, **agreement.to_dict()},
    }


def test_diagnosis_json_schema_and_figures(tmp_path):
    written = reporting.write_diagnosis(_synthetic_result(), tmp_path)
    assert [p.name for p in written] == [
        "diagnostics.json",
        "entropy_probability.png",
        "topk_vs_exact.png",
    ]
    payload = json.loads((tmp_path / "diagnostics.json").read_text())
    assert payload["schema"] == reporting.SCHEMA
    stats = payload["statistics"]
    for key in (
        "tokens",
        "mean_entropy",
        "mean_target_prob",
        "mean_ce",
        "confident_conflicts",
        "confident_conflict_frac",
        "conflict_thresholds",
        "mean_weight",
        "histogram_2d",
        "entropy_histogram",
    ):
        assert key in stats, key
    assert stats["tokens"] == 500
    counts = stats["histogram_2d"]["counts"]
    assert len(counts) == 50 and all(len(row) == 50 for row in counts)
    assert len(stats["histogram_2d"]["entropy_edges"]) == 51
    assert sum(stats["entropy_histogram"]["counts"]) == 500
    agreement = payload["topk_vs_exact"]
    for key in ("pearson_r", "mean_abs_error", "weight_mean_abs_error", "bins", "above_normaliser"):
        assert key in agreement, key
    assert agreement["above_normaliser"]["count"] > 0  # exact entropy reaches 1.2 ln K
    for path in written[1:]:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    summary = reporting.format_diagnosis(payload)
    assert "confident conflicts" in summary and "Pearson r" in summary


def _metrics_lines(kind: str) -> list[str]:
    lines = []
    for iteration in range(1, 6):
        lm = 3.0 / iteration
        eaft = lm * (0.5 if kind == "eaft" else 1.0)
        lines.append(
            json.dumps(
                {
                    "iteration": iteration,
                    "learning_rate": 1e-3,
                    "grad_norm": 1.0,
                    "loss": {
                        "lm loss": lm,
                        "eaft loss": eaft,
                        "eaft/confident_conflict_frac": 0.1 / iteration,
                    },
                }
            )
        )
    lines.append(json.dumps({"iteration": 5, "eval": {"lm loss": 0.9}}))
    return lines


def test_metrics_jsonl_series(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(_metrics_lines("eaft")) + "\n")
    series = read_metrics_jsonl(path)
    assert series["lm loss"] == [(i, 3.0 / i) for i in range(1, 6)]
    assert series["eval/lm loss"] == [(5, 0.9)]
    assert series["learning-rate"][0] == (1, 1e-3)
    assert read_run_log(path) == series


def test_bad_run_logs_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_metrics_lines("eaft")[0] + "\n{not json\n")
    with pytest.raises(RunLogError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics_jsonl(path)
    path.write_text('{"loss": {}}\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:1: expected an object with an integer"):
        read_metrics_jsonl(path)
    with pytest.raises(RunLogError, match="neither"):
        read_run_log(tmp_path / "missing")
    (tmp_path / "empty_tb").mkdir()
    with pytest.raises(RunLogError, match="no TensorBoard event files"):
        read_tensorboard(tmp_path / "empty_tb")


def test_tensorboard_directory_series(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for iteration in range(1, 4):
        writer.add_scalar("lm loss", 2.0 / iteration, iteration)
        writer.add_scalar("eaft/confident_conflict_frac", 0.05, iteration)
    writer.close()
    series = read_run_log(tmp_path / "tb")
    assert [i for i, _ in series["lm loss"]] == [1, 2, 3]
    assert series["lm loss"][2][1] == pytest.approx(2.0 / 3)


def test_run_cli_plots_compared_runs(tmp_path, capsys):
    logs = []
    for kind in ("eaft", "sft"):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("\n".join(_metrics_lines(kind)) + "\n")
        logs += ["--log", f"{kind}={path}"]
    out = tmp_path / "out"
    assert main(["diagnose", "run", *logs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eaft  lm loss" in printed and "3.0000 ->   0.6000" in printed
    curves = json.loads((out / "training_curves.json").read_text())
    assert set(curves["runs"]) == {"eaft", "sft"}
    assert curves["runs"]["sft"]["eaft loss"][0] == [1, 3.0]
    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # Two logs with the same derived label must be told apart.
    same = ["--log", str(tmp_path / "eaft.jsonl"), "--log", str(tmp_path / "eaft.jsonl")]
    assert main(["diagnose", "run", *same, "--out", str(out)]) == 1
    assert "labelled 'eaft'" in capsys.readouterr().err


def test_sparkline_shape():
    assert reporting.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert reporting.sparkline([2.0, 2.0]) == "▁▁"
    assert len(reporting.sparkline(list(range(100)), width=10)) == 10
    assert reporting.sparkline([]) == ""
