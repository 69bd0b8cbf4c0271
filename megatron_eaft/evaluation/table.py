"""The paper's table: per-task scores, target and general averages, change versus the base.

Scores are lm_eval's metrics in percent (accuracy 0.473 -> 47.3). The target average is the
mean over the target-domain tasks, the general average over the general-ability tasks (each
task weighs the same, as in the paper); tasks in neither list are shown but not averaged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_eaft.evaluation.harness import TaskScore
from megatron_eaft.outputs import write_text_atomically

TARGET_AVERAGE = "target avg"
GENERAL_AVERAGE = "general avg"


@dataclasses.dataclass
class ModelResult:
    name: str
    path: str
    kind: str  # hf | megatron
    scores: dict[str, TaskScore]  # task -> score


@dataclasses.dataclass
class Comparison:
    base: str
    target_tasks: list[str]
    general_tasks: list[str]
    other_tasks: list[str]
    models: list[ModelResult]  # the base model first

    def columns(self) -> list[str]:
        """Target tasks, their average, general tasks, their average, then the others."""
        columns: list[str] = []
        for tasks, average in (
            (self.target_tasks, TARGET_AVERAGE),
            (self.general_tasks, GENERAL_AVERAGE),
        ):
            if tasks:
                columns += [*tasks, average]
        return columns + self.other_tasks

    def value(self, model: ModelResult, column: str) -> float:
        averaged = {TARGET_AVERAGE: self.target_tasks, GENERAL_AVERAGE: self.general_tasks}
        tasks = averaged.get(column)
        if tasks is None:
            return model.scores[column].score
        return sum(model.scores[task].score for task in tasks) / len(tasks)

    def base_model(self) -> ModelResult:
        return next(model for model in self.models if model.name == self.base)

    def change(self, model: ModelResult, column: str) -> float:
        return self.value(model, column) - self.value(self.base_model(), column)

    def format(self) -> str:
        """A plain-text table: one row per model; other models' cells carry the change."""
        columns = self.columns()
        lower = {
            task
            for model in self.models
            for task, score in model.scores.items()
            if not score.higher_is_better
        }
        header = ["model", *(f"{c} (lower is better)" if c in lower else c for c in columns)]
        rows = [header]
        for model in self.models:
            cells = [model.name]
            for column in columns:
                cell = f"{self.value(model, column):.1f}"
                if model.name != self.base:
                    cell += f" ({self.change(model, column):+.1f})"
                cells.append(cell)
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            " | ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "-+-".join("-" * width for width in widths))
        metrics = sorted(
            {f"{task}: {s.metric}" for m in self.models for task, s in m.scores.items()}
        )
        lines.append(
            f"scores: lm_eval metric x 100; (+/-) = change vs {self.base}; " + ", ".join(metrics)
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        columns = self.columns()
        return {
            "base": self.base,
            "target_tasks": self.target_tasks,
            "general_tasks": self.general_tasks,
            "other_tasks": self.other_tasks,
            "models": {
                model.name: {
                    "path": model.path,
                    "kind": model.kind,
                    "tasks": {
                        task: dataclasses.asdict(score) | {"score": score.score}
                        for task, score in model.scores.items()
                    },
                    "scores": {column: self.value(model, column) for column in columns},
                    "change_vs_base": {column: self.change(model, column) for column in columns},
                }
                for model in self.models
            },
        }


def write_json(path: Path, data: Any) -> None:
    """Atomically; lm_eval's raw results hold values JSON has no type for (written as text)."""
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """Grouped bars: one group per task and average, one bar per model, changes as labels."""
    import numpy as np

    from megatron_eaft.diagnostics.plots import pyplot, save_figure

    plt = pyplot()
    columns = comparison.columns()
    width = 0.8 / len(comparison.models)
    positions = np.arange(len(columns))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.2))
    for index, model in enumerate(comparison.models):
        values = [comparison.value(model, column) for column in columns]
        bars = axes.bar(
            positions + (index - (len(comparison.models) - 1) / 2) * width,
            values,
            width,
            label=model.name,
        )
        if model.name != comparison.base:
            labels = [f"{comparison.change(model, column):+.1f}" for column in columns]
            axes.bar_label(bars, labels=labels, fontsize=7, padding=2)
    for position, column in enumerate(columns):
        if column in (TARGET_AVERAGE, GENERAL_AVERAGE):
            axes.axvspan(position - 0.45, position + 0.45, color="0.92", zorder=0)
    axes.set_xticks(positions, columns, rotation=20, ha="right")
    axes.set_ylabel("score (lm_eval metric x 100)")
    axes.set_title(f"benchmarks vs the base model ({comparison.base}); labels: change")
    highest = max(comparison.value(m, c) for m in comparison.models for c in columns)
    axes.set_ylim(0, max(highest, 1.0) * 1.12)  # room for the change labels
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(figure, path)
