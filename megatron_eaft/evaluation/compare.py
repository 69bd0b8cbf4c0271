"""Score every model on every task and compare them with the base model.

All input is checked before the first model loads (task names, model directories, tokenizers,
the output directory); then each model is scored in turn, its raw lm_eval results written to
``OUT/lm_eval/NAME.json`` as soon as they exist, and the table goes to ``OUT/results.json``,
``OUT/table.txt`` and ``OUT/scores.png``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_eaft.evaluation.harness import (
    EvaluationError,
    HarnessSettings,
    TaskSpec,
    require_lm_eval,
    score_model,
    task_manager,
    task_score,
    task_spec,
)
from megatron_eaft.evaluation.models import hf_directory, parse_model, resolve_model
from megatron_eaft.evaluation.table import (
    Comparison,
    ModelResult,
    plot_comparison,
    write_json,
)
from megatron_eaft.outputs import write_text_atomically

RESULT_FILES = ("results.json", "table.txt", "scores.png", "lm_eval")


@dataclasses.dataclass
class EvaluationRequest:
    models: list[str]  # NAME=PATH or PATH; the base model is `base`, else the first
    target_tasks: list[str]
    general_tasks: list[str]
    out: Path
    other_tasks: list[str] = dataclasses.field(default_factory=list)
    base: str | None = None
    include_paths: list[Path] = dataclasses.field(default_factory=list)
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> metric[,filter]
    tokenizer: Path | None = None
    settings: HarnessSettings = dataclasses.field(default_factory=HarnessSettings)
    overwrite: bool = False


def _duplicates(items: Sequence[str]) -> list[str]:
    return sorted({item for item in items if list(items).count(item) > 1})


def compare_models(request: EvaluationRequest, log: Callable[[str], None] = print) -> Comparison:
    require_lm_eval()  # the first thing a user without the extra needs to hear
    roles = {
        "target": request.target_tasks,
        "general": request.general_tasks,
        "other": request.other_tasks,
    }
    specs: dict[str, TaskSpec] = {}
    names: dict[str, list[str]] = {role: [] for role in roles}
    for role, items in roles.items():
        for item in items:
            spec = task_spec(item)
            names[role].append(spec.name)
            specs.setdefault(spec.name, spec)
    all_names = [name for group in names.values() for name in group]
    if not all_names:
        raise EvaluationError("no tasks: give --target-tasks, --general-tasks or --tasks")
    if repeated := _duplicates(all_names):
        raise EvaluationError(f"task {', '.join(repeated)} is listed twice (a task has one role)")
    if unknown := sorted(set(request.metrics) - set(all_names)):
        raise EvaluationError(f"--metric for {', '.join(unknown)}, which is not a task to run")

    parsed = [parse_model(text) for text in request.models]
    if not parsed:
        raise EvaluationError("no models: give --model NAME=PATH (the base model first)")
    if repeated := _duplicates([name for name, _ in parsed]):
        raise EvaluationError(f"model name {', '.join(repeated)} is used twice")
    base = request.base or parsed[0][0]
    if base not in {name for name, _ in parsed}:
        raise EvaluationError(f"--base {base} is not one of the --model names")
    parsed.sort(key=lambda item: item[0] != base)  # the base first, the rest in order
    base_path = dict(parsed)[base]
    fallback_tokenizer = request.tokenizer or base_path
    models = [resolve_model(name, path, fallback_tokenizer) for name, path in parsed]

    out = request.out
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not request.overwrite:
        raise EvaluationError(f"{out} already holds {', '.join(existing)} (pass --overwrite)")
    manager = task_manager(list(specs.values()), request.include_paths)

    results = []
    for model in models:
        started = time.perf_counter()
        log(f"scoring {model.name} ({model.kind}: {model.path}) on {', '.join(specs)}")
        with hf_directory(model, out) as hf_dir:
            raw = score_model(hf_dir, list(specs.values()), manager, request.settings)
        write_json(out / "lm_eval" / f"{model.name}.json", raw)
        scores = {task: task_score(raw, task, request.metrics.get(task)) for task in specs}
        results.append(ModelResult(model.name, str(model.path), model.kind, scores))
        summary = ", ".join(f"{task} {score.score:.1f}" for task, score in scores.items())
        log(f"  {model.name}: {summary} ({time.perf_counter() - started:.0f} s)")

    comparison = Comparison(
        base=base,
        target_tasks=names["target"],
        general_tasks=names["general"],
        other_tasks=names["other"],
        models=results,
    )
    write_json(out / "results.json", comparison.as_dict())
    write_text_atomically(out / "table.txt", comparison.format() + "\n")
    plot_comparison(comparison, out / "scores.png")
    return comparison
