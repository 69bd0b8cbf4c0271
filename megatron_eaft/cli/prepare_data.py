"""`megatron-eaft prepare-data`: chat / prompt-response / plain-text JSONL -> packed dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_eaft.data.chat_encoding import LOSS_ON_CHOICES
from megatron_eaft.data.packing import PACKING_MODES
from megatron_eaft.data.records import INPUT_FORMATS


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="tokenise chat JSONL with the model's chat template into a packed SFT dataset",
        description=(
            "Tokenise chat JSONL ({'messages': [...], 'tools': [...]}) or prompt/response JSONL "
            "with the model's HF tokenizer and chat template, mask the loss to assistant tokens, "
            "pack into rows of --seq-length and write Megatron-Core indexed datasets "
            "(OUTPUT/tokens.bin/.idx, OUTPUT/loss_mask.bin/.idx, OUTPUT/metadata.json). "
            "Plain-text JSONL ({'text': ...}, e.g. a general-ability evaluation set) is "
            "tokenised without a template, with an end-of-text token, and has loss on every "
            "token. One dataset holds chats or plain text, not both."
        ),
    )
    parser.add_argument("--input", nargs="+", type=Path, required=True, help="JSONL file(s)")
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="local HF model or tokenizer directory"
    )
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument("--seq-length", type=int, required=True, help="positions per training row")
    parser.add_argument(
        "--format",
        choices=INPUT_FORMATS,
        default="auto",
        dest="input_format",
        help="record format; auto (default) detects it per line from the keys "
        "(messages / prompt+response / text)",
    )
    parser.add_argument(
        "--loss-on",
        choices=LOSS_ON_CHOICES,
        default="all",
        help="train on all assistant turns or only the last one (default: all)",
    )
    parser.add_argument(
        "--packing",
        choices=PACKING_MODES,
        default="first-fit",
        help="first-fit (decreasing), greedy (input order), or pad (one sample per row)",
    )
    parser.add_argument(
        "--pad", action="store_const", const="pad", dest="packing", help="same as --packing pad"
    )
    parser.add_argument(
        "--chat-template", type=Path, default=None, help="Jinja file replacing the tokenizer's"
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default={},
        help="JSON object of template variables, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="count and report bad lines instead of failing"
    )
    parser.add_argument(
        "--allow-role",
        dest="allow_roles",
        action="append",
        default=[],
        metavar="ROLE",
        help="accept this chat role besides system/user/assistant/tool (repeatable); "
        "any other role is a bad line",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenisation processes")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the row shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep rows in packing order")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output made by prepare-data (nothing else is replaced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_eaft.data.prepare import PrepareConfig, prepare_dataset

    config = PrepareConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output=args.output,
        seq_length=args.seq_length,
        input_format=args.input_format,
        loss_on=args.loss_on,
        packing=args.packing,
        chat_template_file=args.chat_template,
        template_kwargs=args.chat_template_kwargs,
        skip_bad=args.skip_bad,
        extra_roles=tuple(args.allow_roles),
        workers=args.workers,
        shuffle_seed=None if args.no_shuffle else args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        summary = prepare_dataset(config)
    except (ValueError, OSError) as error:
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 1
    print(summary.format(config))
    print(f"wrote {Path(args.output).absolute()}")
    return 0
