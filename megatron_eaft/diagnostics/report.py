"""Writing diagnostics out: JSON (atomically), PNG figures, and short console summaries."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_eaft.diagnostics.run_logs import Series
from megatron_eaft.outputs import write_json_atomically

SCHEMA = "megatron_eaft.diagnostics/1"
DIAGNOSIS_FILE = "diagnostics.json"
HISTOGRAM_PNG = "entropy_probability.png"
AGREEMENT_PNG = "topk_vs_exact.png"
CURVES_PNG = "training_curves.png"
CURVES_FILE = "training_curves.json"
_SPARKS = "▁▂▃▄▅▆▇█"


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """JSON to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    write_json_atomically(path, payload, indent=1)
    return path


def write_diagnosis(
    result: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True
) -> list[Path]:
    """``diagnostics.json`` plus the histogram and top-K agreement figures; returns the paths."""
    from megatron_eaft.diagnostics import plots as figures

    out_dir = Path(out_dir)
    written = [write_json(out_dir / DIAGNOSIS_FILE, {"schema": SCHEMA, **result})]
    if plots:
        written.append(
            figures.plot_entropy_probability(result["statistics"], out_dir / HISTOGRAM_PNG)
        )
        written.append(
            figures.plot_topk_agreement(result["topk_vs_exact"], out_dir / AGREEMENT_PNG)
        )
    return written


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_diagnosis(result: Mapping[str, Any]) -> str:
    """A few lines for the console: the scalars, the weights per kind, top-K vs exact."""
    stats = result["statistics"]
    agreement = result["topk_vs_exact"]
    thresholds = stats["conflict_thresholds"]
    weights = ", ".join(f"{kind} {_number(w, 3)}" for kind, w in stats["mean_weight"].items())
    lines = [
        f"tokens {stats['tokens']:,} (loss-masked) in {result['rows']} of "
        f"{result['dataset_rows']} rows",
        f"mean normalised entropy {_number(stats['mean_entropy'])}, mean p(target) "
        f"{_number(stats['mean_target_prob'])}, mean CE {_number(stats['mean_ce'])}",
        f"confident conflicts (entropy < {thresholds['entropy']:g} and p < "
        f"{thresholds['target_prob']:g}): {stats['confident_conflicts']:,} = "
        f"{_percent(stats['confident_conflict_frac'])}",
        f"mean weight per kind: {weights}",
        f"top-{agreement['k']} vs exact entropy: Pearson r {_number(agreement['pearson_r'], 5)}, "
        f"mean |error| {_number(agreement['mean_abs_error'])} (x ln K), weight error "
        f"{_number(agreement['weight_mean_abs_error'])}; above ln K: "
        f"{agreement['above_normaliser']['count']:,} tokens",
    ]
    errors = agreement["bins"]["mean_abs_error"]
    edges = agreement["bins"]["edges"]
    per_bin = " ".join("  -  " if e is None else f"{e:.3f}" for e in errors)
    lines.append(
        f"  mean |error| per exact-entropy bin ({len(errors)} bins of {edges[1] - edges[0]:.2f} "
        f"x ln K, low to high): {per_bin}"
    )
    return "\n".join(lines)


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Unicode block sparkline of ``values`` averaged into at most ``width`` buckets."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    buckets = min(width, len(values))
    averaged = []
    for b in range(buckets):
        chunk = values[b * len(values) // buckets : (b + 1) * len(values) // buckets]
        chunk = [v for v in chunk if math.isfinite(v)]
        averaged.append(sum(chunk) / len(chunk) if chunk else math.nan)
    low, high = min(finite), max(finite)
    span = high - low
    return "".join(
        " "
        if not math.isfinite(v)
        else _SPARKS[
            0 if span == 0 else min(len(_SPARKS) - 1, int((v - low) / span * len(_SPARKS)))
        ]
        for v in averaged
    )


def format_curves(runs: Mapping[str, Mapping[str, Series]], keys: Sequence[str]) -> str:
    """One line per (run, key): first -> last value and a sparkline."""
    label_width = max((len(label) for label in runs), default=0)
    key_width = max((len(key) for key in keys), default=0)
    lines = []
    for label, series in runs.items():
        for key in keys:
            points = series.get(key)
            if not points:
                continue
            values = [value for _, value in points]
            lines.append(
                f"{label:<{label_width}}  {key:<{key_width}}  {values[0]:8.4f} -> "
                f"{values[-1]:8.4f}  {sparkline(values)}"
            )
    return "\n".join(lines)


def write_curves(
    runs: Mapping[str, Mapping[str, Series]], out_dir: str | os.PathLike, *, plots: bool = True
) -> list[Path]:
    """``training_curves.json`` (the series) and ``training_curves.png``."""
    from megatron_eaft.diagnostics import plots as figures

    out_dir = Path(out_dir)
    payload = {
        "schema": SCHEMA,
        "runs": {
            label: {key: [list(point) for point in points] for key, points in series.items()}
            for label, series in runs.items()
        },
    }
    written = [write_json(out_dir / CURVES_FILE, payload)]
    if plots:
        written.append(figures.plot_training_curves(runs, out_dir / CURVES_PNG))
    return written
