"""lm-evaluation-harness (``lm_eval``) behind two calls: load the tasks, score one HF directory.

Tasks are lm_eval's own (``mmlu``, ``gsm8k``, ``ifeval``, ...), tasks in ``--include-path``
directories (lm_eval's TaskManager include_path), or YAML task files given by path. Every name
is checked before a model is loaded; lm_eval's index of its ~15,000 built-in tasks is only built
when a task is not found in the include paths (it costs ~12 s of CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

LM_EVAL_MISSING = (
    "megatron-eaft evaluate needs lm-evaluation-harness: pip install 'megatron-eaft[eval]'"
)
YAML_SUFFIXES = (".yaml", ".yml")


class EvaluationError(ValueError):
    """Bad evaluation input (unknown task, metric, model, missing package); the message names it."""


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise EvaluationError(f"{LM_EVAL_MISSING} ({error})") from None
    return lm_eval


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # the task's name, as lm_eval reports it and the table shows it
    load: str  # what lm_eval loads: the name, or a YAML file's path


class _TaskFileLoader(yaml.SafeLoader):
    """Reads a task YAML for its name only: ``!function`` and other tags become None."""


_TaskFileLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_spec(item: str) -> TaskSpec:
    """A task name, or the path of a YAML task file (named by its ``task:`` key)."""
    if not item.endswith(YAML_SUFFIXES):
        return TaskSpec(item, item)
    path = Path(item)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)
    except FileNotFoundError:
        raise EvaluationError(f"task file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise EvaluationError(f"task file {path} is not valid YAML: {error}") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise EvaluationError(f"task file {path} has no `task: NAME` (groups: give their name)")
    return TaskSpec(name, str(path.absolute()))


def task_manager(specs: Sequence[TaskSpec], include_paths: Sequence[Path]) -> Any:
    """lm_eval's TaskManager that knows every named task; an unknown name is an error."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise EvaluationError(f"--include-path {path} is not a directory of task YAML files")
    paths = [str(Path(path).absolute()) for path in include_paths]
    names = [spec.name for spec in specs if spec.load == spec.name]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise EvaluationError(
            f"unknown task {', '.join(unknown)}: not one of lm_eval's tasks (its task list: `lm-eval ls tasks`) "
            f"nor in --include-path {', '.join(paths) or '(none given)'}"
        )
    return manager


@dataclasses.dataclass(frozen=True)
class HarnessSettings:
    """What lm_eval's ``simple_evaluate`` and its ``hf`` model get besides the model path."""

    num_fewshot: int | None = None  # None: each task's own
    limit: float | None = None  # documents per task (a fraction when < 1): quick checks
    batch_size: str = "1"  # or "auto"
    device: str | None = None  # None: the HF backend's default (cuda when there is one)
    dtype: str = "auto"  # HF dtype: auto (the checkpoint's), bfloat16, float32, ...
    model_args: dict[str, str] = dataclasses.field(default_factory=dict)  # more hf arguments
    apply_chat_template: bool = False
    gen_kwargs: str | None = None
    seed: int = 1234


def score_model(
    hf_dir: Path, specs: Sequence[TaskSpec], manager: Any, settings: HarnessSettings
) -> dict[str, Any]:
    """lm_eval's results of one HF directory on the tasks (``simple_evaluate``'s dict)."""
    lm_eval = require_lm_eval()
    seed = settings.seed
    batch_size: int | str = (
        int(settings.batch_size) if settings.batch_size.isdigit() else settings.batch_size
    )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": settings.dtype, **settings.model_args},
        tasks=[spec.load for spec in specs],
        task_manager=manager,
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        batch_size=batch_size,
        device=settings.device,
        log_samples=False,
        apply_chat_template=settings.apply_chat_template,
        gen_kwargs=settings.gen_kwargs,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # lm_eval returns results on its rank 0 only
        raise EvaluationError(
            "lm_eval returned no results (run megatron-eaft evaluate as 1 process)"
        )
    return results


@dataclasses.dataclass(frozen=True)
class TaskScore:
    metric: str  # lm_eval's "metric,filter" key, e.g. "acc,none", "exact_match,strict-match"
    value: float  # as lm_eval reports it (accuracy: 0..1)
    stderr: float | None
    higher_is_better: bool

    @property
    def score(self) -> float:
        """The table's number: the metric in percent, as papers report accuracies."""
        return 100.0 * self.value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def task_score(results: dict[str, Any], task: str, metric: str | None = None) -> TaskScore:
    """One task's (or group's) score: ``metric`` ("acc" or "acc,none"), else its first metric."""
    entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task)
    if entry is None:
        raise EvaluationError(
            f"lm_eval returned no result for task {task} (it returned "
            f"{', '.join(sorted(results.get('results', {})))})"
        )
    reported = [
        key
        for key, value in entry.items()
        if "," in key and not key.split(",")[0].endswith("_stderr") and _is_number(value)
    ]
    if metric is None:
        if not reported:
            raise EvaluationError(f"task {task} reported no metric: {entry}")
        key = reported[0]
    else:
        key = metric if "," in metric else f"{metric},none"
        if key not in reported:
            raise EvaluationError(
                f"task {task} has no metric {key}; it reports {', '.join(reported) or 'none'}"
            )
    name, _, filter_name = key.partition(",")
    stderr = entry.get(f"{name}_stderr,{filter_name}")
    higher_is_better = results.get("higher_is_better", {}).get(task, {}).get(name, True)
    return TaskScore(
        metric=key,
        value=float(entry[key]),
        stderr=float(stderr) if _is_number(stderr) and math.isfinite(stderr) else None,
        higher_is_better=bool(higher_is_better),
    )
