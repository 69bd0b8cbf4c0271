"""`megatron-eaft diagnose model|run`: what EAFT sees in a dataset, and how a run went."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_eaft.cli.convert import positive_int
from megatron_eaft.cli.reporting import report_error


def _labelled_path(text: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (labelled by its own name)."""
    label, sep, path = text.partition("=")
    if sep and label and path:
        return label, Path(path)
    path = Path(text)
    return path.stem if path.is_file() else path.name, path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="entropy / confident-conflict statistics of a model on SFT data; plot training logs",
        description=(
            "model: run a Megatron checkpoint forward over a prepared SFT dataset and write the "
            "(entropy, target probability) histogram, the confident-conflict fraction, the mean "
            "weight each loss kind would give, and how well top-K entropy tracks the exact one. "
            "run: plot 'eaft loss' vs 'lm loss' and the conflict fraction from training logs."
        ),
    )
    actions = parser.add_subparsers(dest="diagnose_command", required=True, metavar="ACTION")

    model = actions.add_parser(
        "model",
        help="forward a checkpoint over SFT data: histograms, conflicts, top-K vs exact entropy",
        description=(
            "Writes OUT/diagnostics.json, OUT/entropy_probability.png and OUT/topk_vs_exact.png. "
            "Starts TP*PP*DP local gloo ranks (CPU); under torchrun/srun each launched rank runs "
            "its share instead and one rank writes."
        ),
    )
    model.add_argument("--megatron", type=Path, required=True, help="Megatron checkpoint root")
    model.add_argument("--data", type=Path, required=True, help="prepare-data output directory")
    model.add_argument("--out", type=Path, required=True, help="output directory")
    model.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size")
    model.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    model.add_argument(
        "--dp", type=positive_int, default=1, help="data parallel size (local ranks only)"
    )
    model.add_argument(
        "--max-tokens", type=positive_int, default=None, help="stop after this many loss tokens"
    )
    model.add_argument("--topk", type=positive_int, default=20, help="K of the top-K entropy")
    model.add_argument(
        "--norm", choices=("lnk", "paper"), default="lnk", help="entropy normaliser (ln K or 3.0)"
    )
    model.add_argument(
        "--conflict-entropy",
        type=float,
        default=0.15,
        help="confident conflict: normalised entropy below this ...",
    )
    model.add_argument(
        "--conflict-prob", type=float, default=0.15, help="... and target probability below this"
    )
    model.add_argument("--alpha", type=float, default=1.0, help="EAFT exponent for mean weights")
    model.add_argument("--bins", type=positive_int, default=50, help="histogram bins per axis")
    model.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="model dtype"
    )
    model.add_argument("--no-plots", action="store_true", help="JSON only")
    model.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="accept data tokenised with another tokenizer than the checkpoint's",
    )
    model.set_defaults(func=run)

    run_logs = actions.add_parser(
        "run",
        help="plot training curves from TensorBoard dirs or JSONL metrics files",
        description=(
            "Writes OUT/training_curves.png and OUT/training_curves.json from one or more runs "
            "(LABEL=PATH or PATH; PATH is a TensorBoard directory or a metrics JSONL file)."
        ),
    )
    run_logs.add_argument(
        "--log",
        dest="logs",
        type=_labelled_path,
        action="append",
        required=True,
        metavar="[LABEL=]PATH",
        help="a run's TensorBoard dir or metrics JSONL (repeat to compare runs)",
    )
    run_logs.add_argument("--out", type=Path, required=True, help="output directory")
    run_logs.add_argument("--no-plots", action="store_true", help="JSON only")
    run_logs.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_eaft.diagnostics.run_logs import RunLogError
    from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError

    try:
        if args.diagnose_command == "model":
            return _model(args)
        return _run_logs(args)
    except (ValueError, FileNotFoundError, MegatronCheckpointError, RunLogError) as error:
        return report_error(f"diagnose {args.diagnose_command}: error", error, 1)


def _model(args: argparse.Namespace) -> int:
    from megatron_eaft.diagnostics.model_pass import PassOptions, check_inputs
    from megatron_eaft.ops import EAFTConfig

    options = PassOptions(
        eaft=EAFTConfig(
            topk=args.topk,
            norm=args.norm,
            alpha=args.alpha,
            conflict_entropy_threshold=args.conflict_entropy,
            conflict_prob_threshold=args.conflict_prob,
        ),
        max_tokens=args.max_tokens,
        entropy_bins=args.bins,
        prob_bins=args.bins,
        dtype=args.dtype,
    )
    for name in ("megatron", "data"):
        if not getattr(args, name).is_dir():
            raise FileNotFoundError(f"--{name} {getattr(args, name)} is not a directory")
    check_inputs(
        args.megatron,
        args.data,
        args.tp,
        args.pp,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    result = _collect(args, options)
    if result is None:  # a launched rank that does not report
        return 0
    from megatron_eaft.diagnostics.report import format_diagnosis, write_diagnosis

    print(format_diagnosis(result))
    for path in write_diagnosis(result, args.out, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


def _collect(args: argparse.Namespace, options):
    from megatron_eaft.launch import resolve_launch_env

    launched = resolve_launch_env()
    if launched.world_size == 1 or launched.source == "local":
        from megatron_eaft.diagnostics.model_pass import run_pass

        return run_pass(
            args.megatron, args.data, tp=args.tp, pp=args.pp, dp=args.dp, options=options
        )
    # One process per rank from torchrun / srun: join the job and run this rank's share.
    import torch

    from megatron_eaft.diagnostics.model_pass import collect_statistics
    from megatron_eaft.launch import setup_launch_env
    from megatron_eaft.megatron import cpu_runtime

    setup_launch_env()
    cpu_runtime.init_process_group_from_env()
    try:
        return collect_statistics(args.megatron, args.data, args.tp, args.pp, options)
    finally:
        cpu_runtime.destroy_parallel()
        torch.distributed.destroy_process_group()


def _run_logs(args: argparse.Namespace) -> int:
    from megatron_eaft.diagnostics.plots import CONFLICT_KEY, EVAL_KEY, LOSS_KEYS
    from megatron_eaft.diagnostics.report import format_curves, write_curves
    from megatron_eaft.diagnostics.run_logs import read_run_log

    runs = {}
    for label, path in args.logs:
        if label in runs:
            raise ValueError(f"two runs are labelled {label!r}; name them with LABEL=PATH")
        runs[label] = read_run_log(path)
    print(format_curves(runs, (*LOSS_KEYS, EVAL_KEY, CONFLICT_KEY)))
    for path in write_curves(runs, args.out, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0
