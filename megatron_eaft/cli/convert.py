"""`megatron-eaft convert import|export|verify`: HF <-> Megatron-Core torch_dist checkpoints."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DTYPE_CHOICES = ("bf16", "fp16", "fp32")
TRANSFORMER_IMPL_CHOICES = ("local", "transformer_engine")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def byte_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between HF safetensors and Megatron-Core torch_dist",
        description=(
            "HF <-> Megatron-Core torch_dist conversion for Qwen2/2.5, Qwen3, Qwen3-MoE and "
            "the other families in megatron_eaft/models/families. The Megatron side is a "
            "directory with latest_checkpointed_iteration.txt, release/ and the model metadata "
            "needed to rebuild the model; it loads at any TP/PP/EP."
        ),
    )
    commands = parser.add_subparsers(dest="convert_command", required=True, metavar="ACTION")

    imp = commands.add_parser("import", help="HF directory -> Megatron torch_dist checkpoint")
    imp.add_argument("--hf", type=Path, required=True, help="HF model directory (safetensors)")
    imp.add_argument("--out", type=Path, required=True, help="Megatron checkpoint directory")
    imp.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="stored dtype (default: the HF one)"
    )
    imp.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPL_CHOICES,
        default="local",
        help="layer spec the checkpoint is for; the two differ for MoE layer norms",
    )
    imp.add_argument(
        "--make-vocab-size-divisible-by",
        type=positive_int,
        default=128,
        help="pad the vocab to a multiple of this (Megatron-LM's option; default 128)",
    )
    _common_output_options(imp)
    imp.set_defaults(func=run)

    exp = commands.add_parser("export", help="Megatron checkpoint -> HF directory")
    exp.add_argument("--megatron", type=Path, required=True, help="Megatron checkpoint directory")
    exp.add_argument("--out", type=Path, required=True, help="HF output directory")
    exp.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="written dtype (default: as stored)"
    )
    exp.add_argument(
        "--iteration", default=None, help="iteration to export (default: the tracker file's)"
    )
    exp.add_argument(
        "--max-shard-size", type=byte_size, default="5GB", help="safetensors shard size (5GB)"
    )
    _common_output_options(exp)
    exp.set_defaults(func=run)

    ver = commands.add_parser("verify", help="compare HF and Megatron logits on CPU")
    ver.add_argument("--hf", type=Path, required=True, help="HF model directory")
    ver.add_argument("--megatron", type=Path, required=True, help="Megatron checkpoint directory")
    ver.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size")
    ver.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    ver.add_argument("--ep", type=positive_int, default=1, help="expert parallel size")
    ver.add_argument("--batch", type=positive_int, default=2, help="sequences compared")
    ver.add_argument("--seq-len", type=positive_int, default=16, help="tokens per sequence")
    ver.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ver.add_argument(
        "--atol", type=float, default=None, help="max allowed |logit diff| (default 1e-2)"
    )
    ver.add_argument(
        "--min-top1", type=float, default=None, help="min top-1 agreement (default 0.99)"
    )
    ver.set_defaults(func=run)


def _common_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out made by the same command (nothing else is replaced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_eaft.convert.hf_io import HFCheckpointError
    from megatron_eaft.convert.torch_dist import CheckpointFormatError
    from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError

    # OSError covers a refused or existing --out, a missing input and a full disk
    # (megatron_eaft.outputs.DiskFullError): each message names the path.
    expected = (
        ValueError,
        OSError,
        HFCheckpointError,
        MegatronCheckpointError,
        CheckpointFormatError,
    )
    try:
        return _ACTIONS[args.convert_command](args)
    except expected as error:
        print(f"convert {args.convert_command}: error: {error}", file=sys.stderr)
        return 1


def _import(args: argparse.Namespace) -> int:
    from megatron_eaft.convert.engine import import_hf_checkpoint

    summary = import_hf_checkpoint(
        args.hf,
        args.out,
        dtype=args.dtype,
        transformer_impl=args.transformer_impl,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        force=args.force,
        progress=not args.no_progress,
    )
    print(summary.line())
    return 0


def _export(args: argparse.Namespace) -> int:
    from megatron_eaft.convert.engine import export_megatron_checkpoint

    summary = export_megatron_checkpoint(
        args.megatron,
        args.out,
        dtype=args.dtype,
        iteration=args.iteration,
        max_shard_bytes=args.max_shard_size,
        force=args.force,
        progress=not args.no_progress,
    )
    print(summary.line())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_eaft.convert.verify import DEFAULT_ATOL, DEFAULT_MIN_TOP1, verify_checkpoint

    atol = DEFAULT_ATOL if args.atol is None else args.atol
    min_top1 = DEFAULT_MIN_TOP1 if args.min_top1 is None else args.min_top1
    result = verify_checkpoint(
        args.hf,
        args.megatron,
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        batch=args.batch,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    verdict = "OK" if result.ok(atol, min_top1) else "FAILED"
    print(
        f"verify TP{args.tp} PP{args.pp} EP{args.ep}: {result.line()} -> {verdict} "
        f"(atol {atol:g}, min top-1 {min_top1:g})"
    )
    return 0 if verdict == "OK" else 2


_ACTIONS = {"import": _import, "export": _export, "verify": _verify}
