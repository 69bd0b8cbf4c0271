"""The paper's claim in miniature: SFT, EAFT, DFT and masked SFT over a grid, forgetting measured.

``examples/forgetting/PROTOCOL.md`` is the design and the decision rule (fixed before the first
run); this module carries it out. It reuses the demo's data, tokenizer and plain-torch
pre-training (:func:`megatron_eaft.demo.pipeline.build_base_model`), fine-tunes through
``megatron-eaft finetune`` (``run_training`` on worker-pool ranks, TP=1) with named evaluation
sets (``eval.sets``), and scores the chosen checkpoints with ``megatron-eaft evaluate``
(lm-evaluation-harness on local tasks). Megatron never runs in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import queue
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron_eaft.demo.lm_eval_tasks import (
    GENERAL_TASKS,
    TARGET_TASK,
    score_on_local_tasks,
    write_jsonl,
    write_lm_eval_tasks,
)
from megatron_eaft.demo.pipeline import evaluate_rank, finetune_rank
from megatron_eaft.demo.pretrain import TINY_SHAPE, ModelShape, PretrainSettings
from megatron_eaft.megatron.launcher import WorkerPool

MARKER_FILE = ".megatron-eaft-forgetting"
WRITER = "examples/forgetting/run.py"
EVAL_SETS = ("target", "general", "general_text")


@dataclasses.dataclass(frozen=True)
class ForgettingSettings:
    # Base model and data (the fields build_base_model reads).
    general_documents: int = 800
    vocab_size: int = 1024
    shape: ModelShape = dataclasses.field(
        default_factory=lambda: ModelShape(
            hidden_size=192,
            intermediate_size=576,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=48,
            max_position_embeddings=256,
        )
    )
    pretrain: PretrainSettings = dataclasses.field(
        default_factory=lambda: PretrainSettings(steps=600)
    )
    held_out: str = "mod-7-is-3"
    # Fine-tuning grid.
    methods: tuple[str, ...] = ("sft", "eaft", "dft", "masked")
    learning_rates: tuple[float, ...] = (3e-4, 1e-3)
    steps: tuple[int, ...] = (40, 80, 120)  # evenly spaced: eval + checkpoint every steps[0]
    seeds: tuple[int, ...] = (1, 2, 3)
    seq_length: int = 128
    global_batch_size: int = 8
    micro_batch_size: int = 8
    warmup_fraction: float = 0.1  # of the longest run, then constant LR
    conflict_entropy: float = 0.15  # masked SFT's and the diagnostics' confident conflict
    conflict_prob: float = 0.15
    # Measurements.
    general_text_documents: int = 200
    diagnose_tokens: int = 4000
    target_questions: int | None = None  # lm_eval task sizes (None: all)
    general_questions: int | None = None
    eval_batch_size: int = 32
    # Parallel fine-tunes (one 1-thread TP=1 rank each): one per core.
    parallel_jobs: int = 2
    match_fraction: float = 0.9  # T* = this x the lower of SFT's and EAFT's best target score

    def __post_init__(self) -> None:
        spacing = self.steps[0]
        if any(step != spacing * (i + 1) for i, step in enumerate(self.steps)):
            raise ValueError(f"steps must be evenly spaced from the first, got {self.steps}")
        if not {"sft", "eaft"} <= set(self.methods):
            raise ValueError("methods must include sft and eaft (the rule compares them)")


FULL = ForgettingSettings()
# The whole pipeline in seconds (the test): tiny model, two methods, one cell, two seeds.
QUICK = ForgettingSettings(
    general_documents=60,
    vocab_size=400,
    shape=dataclasses.replace(TINY_SHAPE, num_hidden_layers=1),
    pretrain=PretrainSettings(steps=4, batch_size=4, seq_length=64, warmup=1),
    methods=("sft", "eaft"),
    learning_rates=(1e-3,),
    steps=(2,),
    seeds=(1,),
    seq_length=64,
    global_batch_size=2,
    micro_batch_size=2,
    general_text_documents=8,
    diagnose_tokens=200,
    target_questions=4,
    general_questions=4,
    parallel_jobs=1,
)


class ForgettingError(RuntimeError):
    """A stage of the experiment failed its check; the message says which."""


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    lr: float
    step: int

    @property
    def label(self) -> str:
        return f"{self.method} lr {self.lr:g} x {self.step} steps"


def score(loss: float) -> float:
    """100 x exp(-loss): the geometric-mean probability (%) of each reference token."""
    return 100.0 * math.exp(-loss)


# --- data ----------------------------------------------------------------------------------------


def write_eval_sources(settings: ForgettingSettings, data_dir: Path) -> dict[str, Path]:
    """The three eval sets' JSONL (the target one is the demo data's domain_eval.jsonl)."""
    from megatron_eaft.demo.data import as_chat, general_questions, read_general

    general = [as_chat(qa) for qa in general_questions()]
    documents = read_general(data_dir / "general.jsonl")[: settings.general_text_documents]
    return {
        "target": data_dir / "domain_eval.jsonl",
        "general": write_jsonl(data_dir / "general_eval.jsonl", general),
        "general_text": write_jsonl(
            data_dir / "general_text_eval.jsonl", [{"text": doc} for doc in documents]
        ),
    }


# --- configs -------------------------------------------------------------------------------------


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_seed{seed}"


def finetune_config(
    settings: ForgettingSettings,
    run_dir: Path,
    paths: dict[str, Path],
    *,
    method: str,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """One fine-tune of the grid as `megatron-eaft finetune` YAML (paths relative to run_dir)."""
    longest, spacing = settings.steps[-1], settings.steps[0]

    def rel(path: Path) -> str:
        return os.path.relpath(path, run_dir)

    return {
        "model": {
            "checkpoint": rel(paths["base_megatron"]),
            "dtype": "fp32",
            "transformer_impl": "local",
        },
        "parallel": {"tensor": 1},
        "data": {
            "path": rel(paths["sft_data"]),
            "micro_batch_size": settings.micro_batch_size,
            "global_batch_size": settings.global_batch_size,
            "seed": seed,
        },
        "train": {"iterations": longest, "seed": seed},
        "optimizer": {
            "lr": lr,
            "min_lr": lr,
            "warmup_iterations": max(1, round(settings.warmup_fraction * longest)),
            "decay_style": "constant",
            "weight_decay": 0.0,
        },
        "eaft": {
            "kind": method,
            "check_finite": True,
            "masked_entropy_threshold": settings.conflict_entropy,
            "masked_prob_threshold": settings.conflict_prob,
        },
        "checkpoint": {"save": "checkpoints", "save_interval": spacing},
        "eval": {
            "interval": spacing,
            "iterations": 10_000,  # capped by each set's size: every row once
            "sets": {name: rel(paths[f"eval_{name}"]) for name in EVAL_SETS},
        },
        "logging": {"interval": spacing, "metrics_file": "metrics.jsonl"},
    }


def base_eval_config(settings: ForgettingSettings, run_dir: Path, paths: dict[str, Path]):
    """The grid's config with nothing to save: evaluate_rank builds the trainer, never trains."""
    lr = settings.learning_rates[0]
    config = finetune_config(settings, run_dir, paths, method="sft", lr=lr, seed=0)
    config["checkpoint"] = {"save": None}
    return config


def _write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    """Write a finetune config and load it here: a bad one fails before any rank starts."""
    import yaml

    from megatron_eaft.outputs import write_text_atomically
    from megatron_eaft.train.config import load_config

    write_text_atomically(path, yaml.safe_dump(payload, sort_keys=False))
    load_config(str(path))
    return path


# --- the rule ------------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, sd


def choose_settings(
    cells: dict[Cell, dict[str, list[float]]], methods: Sequence[str], match_fraction: float
) -> tuple[float, dict[str, tuple[Cell, bool]]]:
    """PROTOCOL.md rule 1-2: T*, then per method (its chosen cell, whether it reaches T*)."""

    def mean(cell: Cell, key: str) -> float:
        return statistics.fmean(cells[cell][key])

    def best_target(method: str) -> float:
        return max(mean(cell, "T") for cell in cells if cell.method == method)

    level = match_fraction * min(best_target("sft"), best_target("eaft"))
    chosen = {}
    for method in methods:
        own = [cell for cell in cells if cell.method == method]
        reaching = [cell for cell in own if mean(cell, "T") >= level]
        if reaching:
            best = min(reaching, key=lambda c: (-mean(c, "G"), c.step, c.lr))
            chosen[method] = (best, True)
        else:
            chosen[method] = (max(own, key=lambda c: mean(c, "T")), False)
    return level, chosen


def verdict(
    eaft_general: Sequence[float],
    sft_general: Sequence[float],
    bench_difference: float,
    both_reach: bool,
) -> dict[str, Any]:
    """PROTOCOL.md rule 3 on the seeds' eval-set general scores and the benchmark difference."""
    eaft_mean, eaft_sd = _mean_sd(eaft_general)
    sft_mean, sft_sd = _mean_sd(sft_general)
    difference = eaft_mean - sft_mean
    se = math.sqrt(eaft_sd**2 / len(eaft_general) + sft_sd**2 / len(sft_general))
    if not both_reach:
        outcome = "not compared: SFT or EAFT did not reach T*"
    elif not math.isfinite(se):
        outcome = "not decidable: one seed gives no standard error"
    elif abs(difference) <= 2 * se:
        outcome = "no difference resolved"
    elif (difference > 0) != (bench_difference > 0):
        outcome = "inconclusive: the eval sets and the benchmarks disagree"
    else:
        outcome = "holds" if difference > 0 else "reversed: SFT keeps more"
    return {"D": difference, "SE": se, "D_bench": bench_difference, "outcome": outcome}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (higher is better), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


# --- the experiment ------------------------------------------------------------------------------


def _run_parallel(pools: Sequence[WorkerPool], jobs: Sequence[tuple], log) -> list[Any]:
    """Each job ``(fn, *args)`` on one rank of whichever pool is free; results in job order."""
    free: queue.Queue[WorkerPool] = queue.Queue()
    for pool in pools:
        free.put(pool)

    def run(job: tuple) -> Any:
        pool = free.get()
        try:
            return pool.run(job[0], 1, *job[1:], timeout=3600)[0]
        finally:
            free.put(pool)

    with ThreadPoolExecutor(max_workers=len(pools)) as executor:
        return list(executor.map(run, jobs))


def run_forgetting(
    out: Path,
    settings: ForgettingSettings = FULL,
    log: Callable[[str], None] = print,
    pool: WorkerPool | None = None,
) -> dict[str, Any]:
    """Every stage of PROTOCOL.md into ``out`` (emptied first); returns the results.

    ``pool``: run every Megatron job on its rank 0, one at a time (the tests); by default
    ``settings.parallel_jobs`` one-rank pools are started and fine-tunes run side by side.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    from megatron_eaft.demo.pipeline import StageTimer, build_base_model, cpu_seconds
    from megatron_eaft.demo.pipeline import prepare_output_dir as prepare_dir

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)  # each rank and this process: one thread per core
    out = Path(out).absolute()
    prepare_dir(out, MARKER_FILE, WRITER)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    timer = StageTimer(log)
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings), "out": str(out)}
    paths = {
        "data": out / "data",
        "tokenizer": out / "tokenizer",
        "base_hf": out / "base_hf",
        "base_megatron": out / "base_megatron",
        "sft_data": out / "prepared" / "train",
        "runs": out / "runs",
        **{f"eval_{name}": out / "prepared" / name for name in EVAL_SETS},
    }
    with contextlib.ExitStack() as stack:
        if pool is not None:
            pools = [pool]
        else:
            pools = [stack.enter_context(WorkerPool(1)) for _ in range(settings.parallel_jobs)]
        build_base_model(settings, paths, timer, report, log)
        _import_and_prepare(settings, paths, timer, report, pools[0], log)
        _diagnose(settings, paths, timer, report, pools[0], log)
        cells = _grid(settings, paths, timer, report, pools, log)
    level, chosen = choose_settings(cells, settings.methods, settings.match_fraction)
    report["T_star"] = level
    _benchmark(settings, paths, chosen, timer, report, log)
    _conclude(settings, cells, level, chosen, report, out, log)
    report["stage_seconds"] = timer.seconds
    report["stage_cpu_seconds"] = timer.cpu
    report["total_seconds"] = time.perf_counter() - started
    report["total_cpu_seconds"] = cpu_seconds() - cpu_started
    log(f"\ntotal: {report['total_seconds']:.0f} s wall, {report['total_cpu_seconds']:.0f} s CPU")
    from megatron_eaft.diagnostics.report import write_json

    write_json(out / "results.json", report)
    return report


def _import_and_prepare(settings, paths, timer, report, pool, log) -> None:
    from megatron_eaft.convert.engine import import_hf_checkpoint
    from megatron_eaft.data.prepare import PrepareConfig
    from megatron_eaft.demo.pipeline import _prepare_in_worker

    with timer.stage("convert import"):
        summary = import_hf_checkpoint(
            paths["base_hf"], paths["base_megatron"], dtype="fp32", progress=False
        )
        log(f"   {summary.line()}")
    sources = {"train": paths["data"] / "domain_train.jsonl"}
    sources.update(write_eval_sources(settings, paths["data"]))
    report["prepared"] = {}
    with timer.stage("prepare-data (train + 3 eval sets)"):
        for name, source in sources.items():
            target = paths["sft_data"] if name == "train" else paths[f"eval_{name}"]
            config = PrepareConfig(
                inputs=[source],
                tokenizer=paths["base_hf"],
                output=target,
                seq_length=settings.seq_length,
                input_format="text" if name == "general_text" else "auto",
                progress=False,
            )
            summary = pool.run(_prepare_in_worker, 1, config)[0]
            report["prepared"][name] = summary.as_dict()
            log(f"   {name}: {summary.format(config).splitlines()[0]}")


def _diagnose(settings, paths, timer, report, pool, log) -> None:
    from megatron_eaft.diagnostics.model_pass import PassOptions, run_pass
    from megatron_eaft.ops import EAFTConfig

    with timer.stage("diagnose the base on the domain training set"):
        result = run_pass(
            paths["base_megatron"],
            paths["sft_data"],
            tp=1,
            options=PassOptions(
                eaft=EAFTConfig(check_finite=True), max_tokens=settings.diagnose_tokens
            ),
            runner=pool.run,
        )
    stats = result["statistics"]
    report["diagnostics"] = {
        "tokens": stats["tokens"],
        "mean_entropy": stats["mean_entropy"],
        "confident_conflict_frac": stats["confident_conflict_frac"],
        "mean_weight": stats["mean_weight"],
    }
    log(
        f"   {stats['tokens']} answer tokens: mean normalised entropy {stats['mean_entropy']:.3f}, "
        f"confident conflicts {100 * stats['confident_conflict_frac']:.1f}%"
    )


def _scores(evaluation: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        "T": score(evaluation["target"]["lm loss"]),
        "G": score(evaluation["general"]["lm loss"]),
        "G_text": score(evaluation["general_text"]["lm loss"]),
    }


def _grid(settings, paths, timer, report, pools, log) -> dict[Cell, dict[str, list[float]]]:

    base_dir = paths["runs"] / "base_eval"
    config = _write_yaml(base_dir / "config.yaml", base_eval_config(settings, base_dir, paths))
    with timer.stage("base model on the eval sets"):
        base = _scores(pools[0].run(evaluate_rank, 1, str(config), 1)[0])
    report["base_eval_scores"] = base
    log(f"   base: T {base['T']:.2f}  G {base['G']:.2f}  G_text {base['G_text']:.2f}")
    runs = list(itertools.product(settings.methods, settings.learning_rates, settings.seeds))
    jobs = []
    for method, lr, seed in runs:
        run_dir = paths["runs"] / run_name(method, lr, seed)
        payload = finetune_config(settings, run_dir, paths, method=method, lr=lr, seed=seed)
        jobs.append((finetune_rank, str(_write_yaml(run_dir / "config.yaml", payload)), 1))
    with timer.stage(
        f"finetune x {len(jobs)} ({settings.steps[-1]} steps each, {len(pools)} side by side)"
    ):
        results = _run_parallel(pools, jobs, log)
    cells: dict[Cell, dict[str, list[float]]] = {}
    report["runs"] = {}
    for (method, lr, seed), result in zip(runs, results, strict=True):
        evaluations = result["evaluations"]
        if sorted(evaluations) != list(settings.steps):
            raise ForgettingError(
                f"{run_name(method, lr, seed)} evaluated at {sorted(evaluations)}, "
                f"not {list(settings.steps)}"
            )
        per_step = {}
        for step in settings.steps:
            values = _scores(evaluations[step])
            per_step[step] = values
            cell = cells.setdefault(Cell(method, lr, step), {"T": [], "G": [], "G_text": []})
            for key, value in values.items():
                cell[key].append(value)
        report["runs"][run_name(method, lr, seed)] = {
            "scores": per_step,
            "ms_per_iteration": statistics.fmean(r["ms_per_iteration"] for r in result["records"]),
        }
    report["grid"] = [
        {
            "method": cell.method,
            "lr": cell.lr,
            "steps": cell.step,
            **{key: _mean_sd(values) for key, values in scores.items()},
        }
        for cell, scores in cells.items()
    ]
    return cells


def _benchmark(settings, paths, chosen, timer, report, log) -> None:
    """Export each seed's checkpoint at each method's chosen cell; `megatron-eaft evaluate`."""
    from megatron_eaft.convert.checkpoint import copy_side_files
    from megatron_eaft.convert.engine import export_megatron_checkpoint

    models = [f"base={paths['base_hf']}"]
    with timer.stage("convert export (chosen checkpoints)"):
        for method, (cell, _) in chosen.items():
            for seed in settings.seeds:
                run_dir = paths["runs"] / run_name(method, cell.lr, seed)
                target = paths["runs"] / "chosen" / f"{method}_seed{seed}"
                export_megatron_checkpoint(
                    run_dir / "checkpoints", target, iteration=cell.step, progress=False
                )
                copy_side_files(paths["base_hf"], target)
                models.append(f"{method}_seed{seed}={target}")
    tasks = write_lm_eval_tasks(
        paths["data"] / "lm_eval_tasks",
        settings.held_out,
        settings.target_questions,
        settings.general_questions,
    )
    with timer.stage("megatron-eaft evaluate (lm_eval, local tasks)"):
        comparison, _ = score_on_local_tasks(
            models, tasks, paths["data"].parent / "evaluate", settings.eval_batch_size, log
        )
    report["benchmarks"] = comparison.as_dict()
    report["benchmark_dir"] = str(paths["data"].parent / "evaluate")
    # The grid's checkpoints (Adam state included) were only needed for these exports.
    for method, lr, seed in itertools.product(
        settings.methods, settings.learning_rates, settings.seeds
    ):
        shutil.rmtree(paths["runs"] / run_name(method, lr, seed) / "checkpoints")


def _conclude(settings, cells, level, chosen, report, out, log) -> None:
    from megatron_eaft.evaluation.table import GENERAL_AVERAGE, TARGET_AVERAGE
    from megatron_eaft.outputs import write_text_atomically

    benchmarks = report["benchmarks"]["models"]

    def bench(name: str, column: str) -> float:
        return benchmarks[name]["scores"][column]

    base_target, base_general = bench("base", TARGET_AVERAGE), bench("base", GENERAL_AVERAGE)
    base = report["base_eval_scores"]
    rows, table = {}, []
    header = (
        "method | setting            | target avg       | general avg      | general drop"
        " | eval-set T    | eval-set G (retention)"
    )
    table += [header, "-" * len(header)]
    table.append(
        f"base   | -                  | {base_target:5.1f}            | {base_general:5.1f}"
        f"            |          -   | {base['T']:5.2f}         | {base['G']:5.2f} (100%)"
    )
    for method, (cell, reaches) in chosen.items():
        names = [f"{method}_seed{seed}" for seed in settings.seeds]
        target = _mean_sd([bench(n, TARGET_AVERAGE) for n in names])
        general = _mean_sd([bench(n, GENERAL_AVERAGE) for n in names])
        t_set, g_set = _mean_sd(cells[cell]["T"]), _mean_sd(cells[cell]["G"])
        rows[method] = {
            "lr": cell.lr,
            "steps": cell.step,
            "reaches_T_star": reaches,
            "target_avg": target,
            "general_avg": general,
            "general_drop": general[0] - base_general,
            "target_change": target[0] - base_target,
            "eval_T": t_set,
            "eval_G": g_set,
        }
        setting = f"lr {cell.lr:g} x {cell.step:>3}" + ("" if reaches else " <T*")
        table.append(
            f"{method:<6} | {setting:<18} | {target[0]:5.1f} +- {target[1]:4.1f}    | "
            f"{general[0]:5.1f} +- {general[1]:4.1f}    | {general[0] - base_general:+11.1f}  | "
            f"{t_set[0]:5.2f} +- {t_set[1]:4.2f} | {g_set[0]:5.2f} +- {g_set[1]:4.2f} "
            f"({100 * g_set[0] / base['G']:.0f}%)"
        )
    outcome = verdict(
        cells[chosen["eaft"][0]]["G"],
        cells[chosen["sft"][0]]["G"],
        rows["eaft"]["general_avg"][0] - rows["sft"]["general_avg"][0],
        chosen["eaft"][1] and chosen["sft"][1],
    )
    seeds = len(settings.seeds)
    table += [
        "",
        f"target avg = lm_eval {TARGET_TASK} (held-out, exact match); general avg = mean of "
        f"{', '.join(GENERAL_TASKS)}; x 100, mean +- sd over {seeds} seeds; drop vs base.",
        "eval-set T / G = 100 x exp(-answer-token loss) on the held-out conversions / general "
        "questions (the trainer's eval.sets).",
        f"T* = {level:.2f} ({settings.match_fraction:g} x the lower of SFT's and EAFT's best T); "
        "each method at its cell with T >= T* and the highest G.",
        f"EAFT vs SFT at equal target score: D = {outcome['D']:+.2f} G points "
        f"(2 SE = {2 * outcome['SE']:.2f}), benchmark general avg difference "
        f"{outcome['D_bench']:+.1f} -> the claim {outcome['outcome']}.",
    ]
    report["table"] = rows
    report["verdict"] = outcome
    text = "\n".join(table)
    write_text_atomically(out / "table.txt", text + "\n")
    write_text_atomically(out / "grid.txt", _format_grid(cells, base) + "\n")
    _plot_pareto(cells, base, level, chosen, out / "pareto.png")
    log("\n" + _format_grid(cells, base) + "\n\n" + text)
    log(f"\nwrote {out / 'table.txt'}, {out / 'grid.txt'}, {out / 'pareto.png'}")


def _format_grid(cells, base) -> str:
    lines = ["method |     lr | steps | eval-set T      | eval-set G      | G_text"]
    for cell in sorted(cells, key=lambda c: (c.method, c.lr, c.step)):
        t, g = _mean_sd(cells[cell]["T"]), _mean_sd(cells[cell]["G"])
        text = statistics.fmean(cells[cell]["G_text"])
        lines.append(
            f"{cell.method:<6} | {cell.lr:6g} | {cell.step:5d} | {t[0]:6.2f} +- {t[1]:5.2f} | "
            f"{g[0]:6.2f} +- {g[1]:5.2f} | {text:6.2f}"
        )
    lines.append(
        f"base   |      - |     0 | {base['T']:6.2f}          | {base['G']:6.2f}          | "
        f"{base['G_text']:6.2f}"
    )
    return "\n".join(lines)


def _plot_pareto(cells, base, level, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_eaft.outputs import atomic_output_file

    figure, axes = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(cell.method for cell in cells))
    for index, method in enumerate(methods):
        colour = f"C{index}"
        points = [
            (
                100 * statistics.fmean(cells[c]["G"]) / base["G"],
                statistics.fmean(cells[c]["T"]),
            )
            for c in cells
            if c.method == method
        ]
        axes.scatter(*zip(*points, strict=True), color=colour, alpha=0.5, s=18)
        front = pareto_front(points)
        axes.plot(*zip(*front, strict=True), color=colour, marker="o", label=method)
        cell = chosen[method][0]
        axes.scatter(
            [100 * statistics.fmean(cells[cell]["G"]) / base["G"]],
            [statistics.fmean(cells[cell]["T"])],
            color=colour,
            marker="*",
            s=160,
            edgecolors="black",
        )
    axes.axhline(level, color="grey", linestyle="--", label="T* (matched target)")
    axes.scatter([100], [base["T"]], color="black", marker="s", label="base")
    axes.set_xlabel("general retention: eval-set G / base G (%)")
    axes.set_ylabel("target score: eval-set T (held-out conversions)")
    axes.set_title("Forgetting vs learning (seed means; star: chosen setting)")
    axes.legend()
    figure.tight_layout()
    with atomic_output_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
