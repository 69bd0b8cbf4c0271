"""`megatron-eaft` command line: one sub-command per module, each exposing `add_parser`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `add_parser(subparsers) -> None`, registering a parser whose
# `func(args) -> int` runs the command. Imported lazily so `--help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "prepare_data",
    "convert",
    "finetune",
    "evaluate",
    "diagnose",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-eaft",
        description="Entropy-Adaptive Fine-Tuning for Megatron-Core.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"megatron_eaft.cli.{name}").add_parser(subparsers)
    subparsers.add_parser(
        "torchrun",
        help="torchrun (same arguments) that exits 0 when a signal stopped every worker cleanly",
        description=importlib.import_module("megatron_eaft.torchrun").__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_eaft import log

    log.configure()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"] and not {"-h", "--help"} & set(argv[1:2]):
        # Every argument after `torchrun` is torchrun's (argparse would read its options).
        from megatron_eaft.torchrun import main as torchrun_main

        return torchrun_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
