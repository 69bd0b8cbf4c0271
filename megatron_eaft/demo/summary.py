"""The demo's closing report as text: conversion check, conflicts, curves, evaluation, timings."""

from __future__ import annotations

from typing import Any

from megatron_eaft.diagnostics.plots import CONFLICT_KEY

_TABLE_ROWS = 8


def _curve_table(series: dict[str, dict[str, list]]) -> list[str]:
    """Loss per loss-masked token at a few iterations, EAFT and SFT side by side."""
    columns = []
    for kind, keys in (
        ("eaft", ("eaft loss", "lm loss", CONFLICT_KEY)),
        ("sft", ("lm loss", CONFLICT_KEY)),
    ):
        if kind in series:
            columns += [(kind, key) for key in keys]
    if not columns:
        return []
    iterations = sorted({i for kind, key in columns for i, _ in series[kind].get(key, [])})
    if not iterations:
        return []
    shown = sorted(
        {
            iterations[round(j * (len(iterations) - 1) / (_TABLE_ROWS - 1))]
            for j in range(_TABLE_ROWS)
        }
    )
    names = {"eaft loss": "eaft loss", "lm loss": "lm loss", CONFLICT_KEY: "conflicts"}
    header = "   iter | " + " | ".join(f"{kind.upper()} {names[key]:>9}" for kind, key in columns)
    lines = [header]
    values = {(kind, key): dict(series[kind].get(key, [])) for kind, key in columns}
    for iteration in shown:
        cells = []
        for kind, key in columns:
            value = values[(kind, key)].get(iteration)
            width = len(kind) + 10
            if value is None:
                cells.append(" " * width)
            elif key == CONFLICT_KEY:
                cells.append(f"{100 * value:>{width - 1}.1f}%")
            else:
                cells.append(f"{value:>{width}.4f}")
        lines.append(f"  {iteration:5d} | " + " | ".join(cells))
    return lines


def _eval_set_table(report: dict[str, Any]) -> list[str]:
    """lm loss of the held-out conversions (domain) and the general text at each evaluation,
    every run side by side; iteration 0 is the base model, measured the same way."""
    runs = {kind: run["eval_sets"] for kind, run in report.get("runs", {}).items()}
    base = report.get("base_eval_sets")
    if not runs or base is None:
        return []
    kinds = list(runs)
    header = "   iter | " + " | ".join(
        f"{kind.upper()} {name:>7}" for kind in kinds for name in ("domain", "general")
    )
    lines = [header]
    iterations = sorted({int(i) for points in runs.values() for i in points})
    for iteration in [0, *iterations]:
        cells = []
        for kind in kinds:
            point = base if iteration == 0 else runs[kind].get(str(iteration))
            width = len(kind) + 8
            for name in ("domain", "general"):
                cells.append(" " * width if point is None else f"{point[name]:>{width}.4f}")
        lines.append(f"  {iteration:5d} | " + " | ".join(cells))
    return lines


def format_report(report: dict[str, Any]) -> str:
    model = report["model"]
    conversion = report["conversion"]
    lines = [
        "=" * 78,
        f"megatron-eaft demo: tiny {model['architecture']} ({model['parameters']:,} parameters, "
        f"vocab {model['vocab_size']}), fine-tuned at TP={conversion['tp']} on CPU (gloo)",
        "=" * 78,
        f"pre-training: {report['pretrain']['steps']} steps on {report['pretrain']['corpus_tokens']:,}"
        f" tokens, loss {report['pretrain']['first_loss']:.2f} -> {report['pretrain']['final_loss']:.3f}",
        f"conversion check (HF vs Megatron TP={conversion['tp']}, fp32): max |logit diff| "
        f"{conversion['max_abs_diff']:.2e}, mean {conversion['mean_abs_diff']:.2e}, top-1 agreement "
        f"{100 * conversion['top1_agreement']:.1f}% over {conversion['positions']} positions -> "
        + ("OK" if conversion["ok"] else "FAILED"),
    ]
    diagnostics = report.get("diagnostics")
    if diagnostics:
        weights = diagnostics["mean_weight"]
        lines += [
            f"base model on the SFT data ({diagnostics['tokens']:,} answer tokens): mean normalised "
            f"entropy {diagnostics['mean_entropy']:.3f}, confident conflicts "
            f"{100 * diagnostics['confident_conflict_frac']:.1f}% (entropy < 0.15 and p < 0.15)",
            f"  mean token weight: eaft {weights['eaft']:.3f}, dft {weights['dft']:.3f}, sft 1; "
            f"top-20 vs exact entropy: Pearson r {diagnostics['topk_vs_exact_pearson_r']:.4f}, "
            f"mean |error| {diagnostics['topk_vs_exact_mean_abs_error']:.4f} x ln K",
            f"  figures: {diagnostics['dir']}",
        ]
    series = report.get("series", {})
    table = _curve_table(series)
    if table:
        lines += [
            "",
            "training curves (per loss-masked token; conflicts = confident-conflict fraction):",
        ]
        lines += table
    eval_sets = _eval_set_table(report)
    if eval_sets:
        lines += [
            "",
            "forgetting while learning: lm loss of the held-out conversions (domain) and of "
            "general text (eval.sets.general), iteration 0 = the base model:",
        ]
        lines += eval_sets
    if report.get("curves"):
        lines += ["", report["curves"], f"  figure: {report['curves_png']}"]
    evaluation = report.get("evaluation")
    if evaluation:
        lines += [
            "",
            f"evaluation with transformers after `convert export` (greedy exact match on "
            f"{evaluation['domain_questions']} held-out and {evaluation['domain_questions']} seen "
            f"conversions and {evaluation['general_questions']} general questions; loss per "
            f"answer token on the held-out conversions; general-text loss on "
            f"{evaluation['general_documents']} documents):",
            "  model | held-out conv. | held-out answer loss | seen conv. | general questions"
            " | general-text loss",
        ]
        for label, result in evaluation["models"].items():
            lines.append(
                f"  {label:>5} | {100 * result['domain_accuracy']:13.1f}% | "
                f"{result['domain_loss']:20.3f} | {100 * result['seen_domain_accuracy']:9.1f}% | "
                f"{100 * result['general_accuracy']:16.1f}% | {result['general_loss']:17.3f}"
            )
        models = evaluation["models"]
        questions = list(next(iter(models.values()))["samples"])
        lines += ["", "samples (transformers generate, greedy):"]
        for question in questions:
            lines.append(f"  Q: {question}")
            lines += [
                f"    {label:>4}: {result['samples'][question]}" for label, result in models.items()
            ]
    benchmarks = report.get("benchmarks")
    if benchmarks:
        lines += [
            "",
            "the paper's table (megatron-eaft evaluate, lm_eval on local tasks: held-out "
            "conversions by exact match; the general questions as a 4-way choice and by exact "
            "match):",
        ]
        lines += [f"  {line}" for line in benchmarks["table"].splitlines()]
    lines += ["", "time per stage (wall; CPU of this process and its ranks):"]
    cpu = report.get("stage_cpu_seconds", {})
    for stage, seconds in report.get("stage_seconds", {}).items():
        lines.append(f"  {stage:<42} {seconds:7.1f} s  ({cpu.get(stage, float('nan')):6.1f} s CPU)")
    if "total_seconds" in report:
        lines.append(
            f"  {'total (with imports and start-up)':<42} {report['total_seconds']:7.1f} s  "
            f"({report.get('total_cpu_seconds', float('nan')):6.1f} s CPU)"
        )
    return "\n".join(lines)
