"""PNG figures of the diagnostics (matplotlib, Agg backend: no display needed).

Every figure is written to a temporary file beside its target and renamed, so a reader never
sees a half-written PNG. matplotlib is the ``plot`` extra; it is imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_eaft.diagnostics.run_logs import Series
from megatron_eaft.outputs import atomic_output_file

LOSS_KEYS = ("lm loss", "eaft loss")
CONFLICT_KEY = "eaft/confident_conflict_frac"
EVAL_KEY = "eval/lm loss"


def pyplot():
    """matplotlib.pyplot on the Agg backend (shared with `megatron-eaft evaluate`'s chart)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'megatron-eaft[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG atomically and close it."""
    path = Path(path)
    try:
        with atomic_output_file(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(figure)
    return path


def plot_entropy_probability(statistics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The paper's picture: tokens by (normalised entropy, target probability), log colour.

    The confident-conflict corner (low entropy AND low target probability) is outlined and
    labelled with the fraction of tokens inside it.
    """
    import numpy as np

    plt = pyplot()
    hist = statistics["histogram_2d"]
    counts = np.asarray(hist["counts"], dtype=np.float64)
    figure, (joint_axes, marginal_axes) = plt.subplots(
        1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.25, 1]}
    )
    image = joint_axes.imshow(
        np.log10(counts.T + 1.0),
        origin="lower",
        extent=(0, 1, 0, 1),
        aspect="auto",
        cmap="viridis",
    )
    figure.colorbar(image, ax=joint_axes, label="log10(tokens + 1)")
    thresholds = statistics["conflict_thresholds"]
    from matplotlib.patches import Rectangle

    joint_axes.add_patch(
        Rectangle(
            (0, 0),
            thresholds["entropy"],
            thresholds["target_prob"],
            fill=False,
            edgecolor="red",
            linewidth=2,
        )
    )
    fraction = statistics.get("confident_conflict_frac")
    label = "confident conflicts" + (f": {100 * fraction:.1f}%" if fraction is not None else "")
    joint_axes.annotate(
        label,
        xy=(thresholds["entropy"], thresholds["target_prob"]),
        xytext=(min(thresholds["entropy"] + 0.05, 0.6), min(thresholds["target_prob"] + 0.12, 0.9)),
        color="red",
        arrowprops={"arrowstyle": "->", "color": "red"},
    )
    joint_axes.set_xlabel("normalised entropy (top-K)")
    joint_axes.set_ylabel("target probability p(y_t)")
    joint_axes.set_title(f"{statistics['tokens']:,} loss-masked tokens")

    edges = np.asarray(statistics["entropy_histogram"]["edges"])
    marginal = np.asarray(statistics["entropy_histogram"]["counts"], dtype=np.float64)
    marginal_axes.bar(edges[:-1], marginal, width=np.diff(edges), align="edge", color="tab:blue")
    marginal_axes.axvline(thresholds["entropy"], color="red", linestyle="--", linewidth=1)
    marginal_axes.set_xlabel("normalised entropy")
    marginal_axes.set_ylabel("tokens")
    mean_entropy = statistics.get("mean_entropy")
    if mean_entropy is not None:
        marginal_axes.set_title(f"entropy histogram (mean {mean_entropy:.3f})")
    return save_figure(figure, path)


def plot_topk_agreement(agreement: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Mean |top-K - exact| normalised entropy per bin of exact entropy, with token counts.

    The last bar (grey, right of 1) holds the tokens whose exact entropy exceeds ln K, where
    the top-K estimate, capped at ln K, cannot follow.
    """
    import numpy as np

    plt = pyplot()
    bins = agreement["bins"]
    above = agreement["above_normaliser"]
    edges = np.asarray(bins["edges"])
    width = float(edges[1] - edges[0])
    lefts = np.append(edges[:-1], edges[-1] + width / 2)
    errors = np.asarray(
        [np.nan if e is None else e for e in [*bins["mean_abs_error"], above["mean_abs_error"]]]
    )
    counts = np.asarray([*bins["counts"], above["count"]], dtype=np.float64)
    colours = ["tab:orange"] * (len(lefts) - 1) + ["tab:gray"]
    figure, error_axes = plt.subplots(figsize=(8, 4.2))
    error_axes.bar(lefts, np.nan_to_num(errors), width=width, align="edge", color=colours)
    error_axes.set_xlabel("exact entropy / ln K   (grey: above ln K)")
    error_axes.set_ylabel("mean |top-K - exact| / ln K")
    count_axes = error_axes.twinx()
    count_axes.plot(lefts + width / 2, counts, color="tab:blue", marker=".", linestyle="none")
    count_axes.set_ylabel("tokens", color="tab:blue")
    if counts.max(initial=0) > 0:
        count_axes.set_yscale("log")
    r = agreement.get("pearson_r")
    error_axes.set_title(
        f"top-{agreement.get('k', '?')} vs exact entropy: Pearson r = "
        + ("n/a" if r is None else f"{r:.4f}")
        + f" over {agreement['tokens']:,} tokens"
    )
    return save_figure(figure, path)


def plot_training_curves(runs: Mapping[str, Mapping[str, Series]], path: str | os.PathLike) -> Path:
    """Loss curves (``lm loss`` solid, ``eaft loss`` dashed, evaluation dotted) and the
    confident-conflict fraction, one colour per run."""
    plt = pyplot()
    figure, (loss_axes, conflict_axes) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted_conflicts = False
    for index, (label, series) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for key, style in zip(LOSS_KEYS, ("-", "--"), strict=True):
            points = series.get(key)
            if points:
                loss_axes.plot(
                    *zip(*points, strict=True), style, color=colour, label=f"{label}: {key}"
                )
        points = series.get(EVAL_KEY)
        if points:
            loss_axes.plot(
                *zip(*points, strict=True), ":o", color=colour, label=f"{label}: {EVAL_KEY}"
            )
        points = series.get(CONFLICT_KEY)
        if points:
            conflict_axes.plot(*zip(*points, strict=True), color=colour, label=label)
            plotted_conflicts = True
    loss_axes.set_xlabel("iteration")
    loss_axes.set_ylabel("loss per loss-masked token")
    loss_axes.set_title("EAFT-weighted loss vs unweighted cross-entropy")
    loss_axes.legend(fontsize="small")
    conflict_axes.set_xlabel("iteration")
    conflict_axes.set_ylabel("fraction of tokens")
    conflict_axes.set_title("confident-conflict fraction")
    if plotted_conflicts:
        conflict_axes.legend(fontsize="small")
    else:
        conflict_axes.text(0.5, 0.5, f"no '{CONFLICT_KEY}' in the logs", ha="center")
    return save_figure(figure, path)
