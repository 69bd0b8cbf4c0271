"""`megatron-eaft evaluate`: base and fine-tuned models on benchmarks, the paper's table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Score models on lm-evaluation-harness tasks with its HF backend and compare each with the base
model: per-task scores, the target-domain average, the general-ability average, and their
change versus the base (how much the fine-tuned models learned, and how much they forgot).

Models are HF directories or megatron-eaft checkpoints (`convert import` outputs, `finetune`
checkpoint.save roots: their latest iteration is exported to a temporary HF directory under
--out). Tasks are lm_eval's (mmlu, gsm8k, ifeval, ...), tasks of --include-path directories,
or YAML task files. Writes OUT/results.json, OUT/table.txt, OUT/scores.png and lm_eval's raw
results per model in OUT/lm_eval/. Needs the `eval` extra: pip install 'megatron-eaft[eval]'.
"""

EPILOG = """\
example:
  megatron-eaft evaluate --model base=/models/Qwen3-4B \\
      --model sft=runs/sft/checkpoints --model eaft=runs/eaft/checkpoints \\
      --target-tasks gsm8k --general-tasks mmlu,ifeval \\
      --metric gsm8k=exact_match,flexible-extract --batch-size auto --dtype bfloat16 --out eval/
"""


def _task_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {text!r}")
    return items


def _metric(text: str) -> tuple[str, str]:
    task, sep, metric = text.partition("=")
    if not sep or not task or not metric:
        raise argparse.ArgumentTypeError(f"expected TASK=METRIC[,FILTER], got {text!r}")
    return task, metric


def _model_args(text: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not sep or not key for key, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return {key: value for key, _, value in pairs}


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="benchmark base and fine-tuned models (lm-evaluation-harness), the forgetting table",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model to score (repeatable): HF directory or megatron-eaft checkpoint; "
        "the first is the base model unless --base says otherwise",
    )
    parser.add_argument("--base", default=None, metavar="NAME", help="the base model's name")
    parser.add_argument(
        "--target-tasks",
        type=_task_list,
        default=[],
        metavar="A,B",
        help="target-domain tasks (averaged: target avg)",
    )
    parser.add_argument(
        "--general-tasks",
        type=_task_list,
        default=[],
        metavar="C,D",
        help="general-ability tasks (averaged: general avg)",
    )
    parser.add_argument(
        "--tasks", type=_task_list, default=[], metavar="E,F", help="more tasks, not averaged"
    )
    parser.add_argument(
        "--include-path",
        dest="include_paths",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="directory of lm_eval task YAML files (repeatable)",
    )
    parser.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        type=_metric,
        default=[],
        metavar="TASK=METRIC[,FILTER]",
        help="the metric a task is scored by (default: the first it reports), e.g. "
        "gsm8k=exact_match,flexible-extract (repeatable)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer for checkpoints without one (default: the base model's)",
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="default: each task's")
    parser.add_argument(
        "--limit", type=_limit, default=None, help="documents per task (< 1: a fraction); checks"
    )
    parser.add_argument("--batch-size", default="1", help="an integer or auto (default 1)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0, cpu (default: lm_eval's)")
    parser.add_argument(
        "--dtype", default="auto", help="HF dtype: auto (the checkpoint's), bfloat16, float32"
    )
    parser.add_argument(
        "--model-args",
        type=_model_args,
        default={},
        metavar="K=V,...",
        help="more arguments of lm_eval's hf model, e.g. parallelize=True",
    )
    parser.add_argument(
        "--apply-chat-template", action="store_true", help="prompt through the chat template"
    )
    parser.add_argument(
        "--gen-kwargs", default=None, help="generation arguments, e.g. temperature=0"
    )
    parser.add_argument("--seed", type=int, default=1234, help="lm_eval's seeds (default 1234)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace results in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_eaft.convert.engine import ConversionError
    from megatron_eaft.convert.torch_dist import CheckpointFormatError
    from megatron_eaft.evaluation.compare import EvaluationRequest, compare_models
    from megatron_eaft.evaluation.harness import EvaluationError, HarnessSettings
    from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError
    from megatron_eaft.outputs import DiskFullError

    request = EvaluationRequest(
        models=args.models,
        base=args.base,
        target_tasks=args.target_tasks,
        general_tasks=args.general_tasks,
        other_tasks=args.tasks,
        include_paths=args.include_paths,
        metrics=dict(args.metrics),
        tokenizer=args.tokenizer,
        out=args.out,
        overwrite=args.overwrite,
        settings=HarnessSettings(
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            model_args=args.model_args,
            apply_chat_template=args.apply_chat_template,
            gen_kwargs=args.gen_kwargs,
            seed=args.seed,
        ),
    )
    try:
        comparison = compare_models(request)
    except (
        EvaluationError,
        MegatronCheckpointError,
        ConversionError,
        CheckpointFormatError,
        DiskFullError,
    ) as error:
        print(f"megatron-eaft evaluate: error: {error}", file=sys.stderr)
        return 2
    print(comparison.format())
    print(f"wrote {args.out / 'results.json'}, table.txt, scores.png")
    return 0
