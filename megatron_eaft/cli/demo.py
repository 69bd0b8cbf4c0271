"""`megatron-eaft demo`: the whole pipeline on CPU in minutes, from generated data to HF output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
End to end on CPU, nothing downloaded: generate a general corpus and a unit-conversion SFT set,
train a BPE tokenizer, pre-train a tiny Qwen3 (transformers, plain torch), save it as HF,
`convert import` + `convert verify`, `prepare-data`, `diagnose model`, EAFT fine-tuning at TP=2
over gloo (and plain SFT for comparison), `convert export`, then load the results with
transformers, generate, and report accuracy and forgetting. Under 10 minutes on 2 cores.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end CPU demo (tiny Qwen3: HF -> Megatron -> EAFT at TP=2 -> HF)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="output directory, emptied first if a previous demo wrote it (default demo_out/)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny version in about a minute (used by the tests)"
    )
    parser.add_argument("--no-sft", action="store_true", help="skip the plain-SFT comparison run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from megatron_eaft.demo.pipeline import FULL, QUICK, DemoError, run_demo

    settings = QUICK if args.quick else FULL
    if args.no_sft:
        settings = dataclasses.replace(settings, compare_sft=False)
    try:
        run_demo(args.out, settings)
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    return 0
