"""The paper's claim in miniature on CPU: `python examples/forgetting/run.py --out DIR [--quick]`.

What it runs and how it decides is examples/forgetting/PROTOCOL.md; the code is
megatron_eaft.demo.forgetting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("forgetting_out"),
        help="output directory, emptied first if a previous run of this script wrote it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a drastically reduced setting that checks the pipeline in seconds (no result)",
    )
    args = parser.parse_args(argv)
    from megatron_eaft.demo.forgetting import FULL, QUICK, run_forgetting
    from megatron_eaft.demo.pipeline import DemoError

    try:
        run_forgetting(args.out, QUICK if args.quick else FULL)
    except DemoError as error:
        print(f"forgetting: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
