"""examples/forgetting end to end on its --quick setting, and the decision rule on made-up cells.

The pipeline test proves the stages connect (pre-train, finetune with eval.sets, selection,
megatron-eaft evaluate, table, plot); it says nothing about the scientific result.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_eaft.demo.forgetting import (
    QUICK,
    Cell,
    choose_settings,
    pareto_front,
    run_forgetting,
    verdict,
)


@pytest.fixture(scope="module")
def quick_run(dist, tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting") / "out"
    lines: list[str] = []
    report = run_forgetting(out, QUICK, log=lines.append, pool=dist)
    return out, report, "\n".join(lines)


def test_quick_pipeline_writes_the_table_the_grid_and_the_plot(quick_run):
    out, report, text = quick_run
    for name in ("table.txt", "grid.txt", "pareto.png", "results.json", "evaluate/table.txt"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.txt").read_text()
    for method in QUICK.methods:
        assert f"\n{method} " in table
    assert "the claim" in table and "T* =" in table
    assert "EAFT vs SFT at equal target score" in text
    # Every (method, lr, step) cell was measured on every seed, and every score is a score.
    cells = {(row["method"], row["lr"], row["steps"]) for row in report["grid"]}
    assert len(cells) == len(QUICK.methods) * len(QUICK.learning_rates) * len(QUICK.steps)
    for row in report["grid"]:
        for key in ("T", "G", "G_text"):
            assert 0 < row[key][0] <= 100
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["table"]) == set(QUICK.methods)
    models = set(saved["benchmarks"]["models"])
    assert models == {"base"} | {f"{m}_seed{s}" for m in QUICK.methods for s in QUICK.seeds}
    # The grid's checkpoints are gone once the chosen ones are exported.
    assert not list((out / "runs").glob("*/checkpoints"))


def _cells(values: dict[tuple[str, int], tuple[list[float], list[float]]]):
    return {Cell(m, 1e-3, step): {"T": t, "G": g} for (m, step), (t, g) in values.items()}


def test_choice_matches_target_then_keeps_the_most_general_ability():
    cells = _cells(
        {
            ("sft", 1): ([10.0], [90.0]),
            ("sft", 2): ([50.0], [40.0]),
            ("eaft", 1): ([30.0], [80.0]),
            ("eaft", 2): ([48.0], [60.0]),
            ("eaft", 3): ([47.0], [70.0]),
        }
    )
    level, chosen = choose_settings(cells, ["sft", "eaft"], 0.9)
    assert level == pytest.approx(0.9 * 48.0)
    assert chosen["sft"] == (Cell("sft", 1e-3, 2), True)
    assert chosen["eaft"] == (Cell("eaft", 1e-3, 3), True)  # T 47 >= 43.2 and G 70 > 60


def test_verdict_needs_two_standard_errors_and_agreeing_benchmarks():
    assert verdict([70, 71, 72], [60, 61, 62], 5.0, True)["outcome"] == "holds"
    assert verdict([70, 71, 72], [60, 61, 62], -1.0, True)["outcome"].startswith("inconclusive")
    assert verdict([60, 61, 62], [70, 71, 72], -1.0, True)["outcome"].startswith("reversed")
    assert verdict([60, 70, 80], [61, 71, 81], 1.0, True)["outcome"] == "no difference resolved"
    assert verdict([70, 71, 72], [60, 61, 62], 5.0, False)["outcome"].startswith("not compared")
    result = verdict([70, 71, 72], [60, 61, 62], 5.0, True)
    assert result["D"] == pytest.approx(10.0)
    assert result["SE"] == pytest.approx(math.sqrt(2 / 3))


def test_pareto_front_drops_dominated_points():
    points = [(1.0, 5.0), (2.0, 4.0), (1.5, 3.0), (3.0, 1.0), (0.5, 0.5)]
    assert pareto_front(points) == [(1.0, 5.0), (2.0, 4.0), (3.0, 1.0)]
