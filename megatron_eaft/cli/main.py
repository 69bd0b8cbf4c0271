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
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_eaft import log

    log.configure()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
