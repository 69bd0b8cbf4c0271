"""JSONL chats (or plain text) -> a packed, loss-masked SFT dataset in Megatron-Core's format.

Three passes, so memory stays flat whatever the dataset size:

1. tokenise every line (optionally in worker processes) into a staging IndexedDataset, one
   sequence per sample, truncating samples longer than a row;
2. plan the rows from the sample lengths alone (`megatron_eaft.data.packing`);
3. copy the samples row by row into the final datasets.

Everything is written into a temporary sibling directory that is renamed onto the output path
only when complete (`megatron_eaft.outputs.atomic_output_dir`), so an interrupted or failed run
never leaves a half-written dataset, and `--overwrite` replaces only a previous dataset.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megatron_eaft.data.chat_encoding import (
    ChatEncoder,
    EncodedChat,
    LossOn,
    TextEncoder,
    load_tokenizer,
)
from megatron_eaft.data.compatibility import tokenizer_fingerprint
from megatron_eaft.data.layout import (
    DATASET_OUTPUT,
    LOSS_MASK_PREFIX,
    TOKENS_PREFIX,
    token_dtype,
    write_metadata,
)
from megatron_eaft.data.packing import PackingMode, pack
from megatron_eaft.data.records import (
    STANDARD_ROLES,
    DataFileError,
    InputFormat,
    PlainText,
    Record,
    RecordError,
    RecordKind,
    check_roles,
    count_lines,
    iter_lines,
    parse_record,
)
from megatron_eaft.outputs import atomic_output_dir, check_output_target

# Bad lines quoted in the summary and the metadata when --skip-bad counts them.
MAX_REPORTED_BAD_LINES = 20


@dataclass
class PrepareConfig:
    inputs: list[Path]
    tokenizer: Path
    output: Path
    seq_length: int
    input_format: InputFormat = "auto"
    loss_on: LossOn = "all"
    packing: PackingMode = "first-fit"
    chat_template_file: Path | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    # Chat roles accepted besides system / user / assistant / tool.
    extra_roles: tuple[str, ...] = ()
    workers: int = 1
    # Row order is shuffled with this seed (None keeps packing order: first-fit opens the rows
    # of the longest samples first, which a sequential reader would see as a curriculum).
    shuffle_seed: int | None = 1234
    overwrite: bool = False
    progress: bool = True


@dataclass
class PrepareSummary:
    lines: int = 0
    samples: int = 0
    bad_lines: int = 0
    truncated: int = 0
    dropped_without_loss: int = 0
    truncated_to_no_loss: int = 0  # every trained token lay beyond the row length
    rows: int = 0
    tokens: int = 0  # tokens of the samples written (after truncation)
    positions: int = 0  # row positions they fill (one fewer per sample: the shift)
    loss_tokens: int = 0  # positions whose label is an assistant token
    padding: int = 0  # row positions left empty
    record_kind: RecordKind | None = None  # chat or text: the kind of every record
    bad_line_examples: list[str] = field(default_factory=list)

    @property
    def loss_fraction(self) -> float:
        return self.loss_tokens / self.positions if self.positions else 0.0

    @property
    def padding_fraction(self) -> float:
        total = self.positions + self.padding
        return self.padding / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loss_fraction": self.loss_fraction,
            "padding_fraction": self.padding_fraction,
        }

    def loss_on(self, config: PrepareConfig) -> str:
        if self.record_kind == "text":
            return "every token (plain text)"
        return f"{config.loss_on} assistant turns"

    def format(self, config: PrepareConfig) -> str:
        lines = [
            f"{self.lines} lines -> {self.samples} samples in {self.rows} rows of "
            f"{config.seq_length} ({config.packing} packing, loss on {self.loss_on(config)})",
            f"tokens: {self.tokens:,}; trained on {self.loss_tokens:,} "
            f"({100 * self.loss_fraction:.1f}% of filled positions); "
            f"padding {100 * self.padding_fraction:.1f}% of row positions",
            f"truncated samples (longer than {config.seq_length + 1} tokens): {self.truncated}",
        ]
        if self.truncated_to_no_loss:
            lines.append(
                "dropped samples whose trained tokens all lay beyond the row (raise "
                f"--seq-length): {self.truncated_to_no_loss}"
            )
        if self.dropped_without_loss:
            lines.append(f"dropped samples with no token to train on: {self.dropped_without_loss}")
        if self.bad_lines:
            lines.append(f"bad lines skipped: {self.bad_lines}")
            lines.extend(f"  {example}" for example in self.bad_line_examples)
            if self.bad_lines > len(self.bad_line_examples):
                lines.append(f"  ... and {self.bad_lines - len(self.bad_line_examples)} more")
        return "\n".join(lines)


# --- tokenisation (runs in the main process or in pool workers) ------------------------------


class RecordEncoder:
    """Chats through the chat template (:class:`ChatEncoder`), plain text without it.

    The chat encoder is built up front, so a bad tokenizer or template fails before any data;
    with ``--format text`` it is not needed, and with ``auto`` a tokenizer without a chat
    template fails only on the first chat record.
    """

    def __init__(self, config: PrepareConfig) -> None:
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.roles = (*STANDARD_ROLES, *config.extra_roles)
        self.text = TextEncoder(self.tokenizer)
        self.chat: ChatEncoder | None = None
        self.chat_unavailable = ""
        if config.input_format == "text":
            return
        template = None
        if config.chat_template_file is not None:
            template = Path(config.chat_template_file).read_text(encoding="utf-8")
        try:
            self.chat = ChatEncoder(
                self.tokenizer,
                loss_on=config.loss_on,
                chat_template=template,
                template_kwargs=config.template_kwargs,
            )
        except ValueError as error:
            if config.input_format != "auto":
                raise
            self.chat_unavailable = str(error)

    def encode(self, record: Record) -> EncodedChat:
        if isinstance(record, PlainText):
            return self.text.encode(record)
        if self.chat is None:
            raise RecordError(f"a chat record, but {self.chat_unavailable}")
        check_roles(record, self.roles)
        return self.chat.encode(record)


_worker_encoder: RecordEncoder | None = None
_worker_input_format: InputFormat = "auto"
KIND_NAMES = {"chat": "chat", "text": "plain-text"}


def _init_worker(config: PrepareConfig) -> None:
    global _worker_encoder, _worker_input_format
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = RecordEncoder(config)
    _worker_input_format = config.input_format


# (path, line, token ids, mask, kind), or (path, line, None, reason, kind) for a bad line whose
# kind is None when the line is no record at all.
EncodedLine = tuple[Path, int, np.ndarray | None, np.ndarray | str, RecordKind | None]


def _encode_line(item: tuple[Path, int, bytes]) -> EncodedLine:
    path, line_number, line = item
    assert _worker_encoder is not None
    try:
        record = parse_record(line, _worker_input_format)
    except RecordError as error:
        return path, line_number, None, str(error), None
    try:
        encoded = _worker_encoder.encode(record)
    except RecordError as error:
        return path, line_number, None, str(error), record.kind
    return path, line_number, encoded.token_ids, encoded.assistant_mask, record.kind


def _encoded_lines(
    config: PrepareConfig, encoder: RecordEncoder, lines: Iterable[tuple[Path, int, bytes]]
) -> Iterator[EncodedLine]:
    global _worker_encoder, _worker_input_format
    if config.workers <= 1:
        _worker_encoder, _worker_input_format = encoder, config.input_format
        yield from map(_encode_line, lines)
        return
    # spawn: the Rust tokenizer's thread pool does not survive fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        yield from pool.imap(_encode_line, lines, chunksize=64)


# --- the three passes -----------------------------------------------------------------------


def _tokenise_to_staging(
    config: PrepareConfig,
    encoder: RecordEncoder,
    staging_prefix: Path,
    dtype: type[np.number],
    summary: PrepareSummary,
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    max_tokens = config.seq_length + 1  # a row of seq_length positions holds seq_length + 1 tokens
    tokens_builder = IndexedDatasetBuilder(f"{staging_prefix}.{TOKENS_PREFIX}.bin", dtype=dtype)
    mask_builder = IndexedDatasetBuilder(f"{staging_prefix}.{LOSS_MASK_PREFIX}.bin", np.uint8)
    total = count_lines(config.inputs) if config.progress else None
    lines = iter_lines(config.inputs)
    first_record: tuple[Path, int] | None = None
    with tqdm(total=total, unit=" lines", desc="tokenising", disable=not config.progress) as bar:
        for path, line_number, token_ids, mask, kind in _encoded_lines(config, encoder, lines):
            bar.update()
            summary.lines += 1
            if kind is not None and first_record is None:
                first_record, summary.record_kind = (path, line_number), kind
            elif kind is not None and kind != summary.record_kind:
                # A dataset-wide mistake, not a bad line: --skip-bad does not skip it.
                raise DataFileError(
                    path,
                    line_number,
                    f"a {KIND_NAMES[kind]} record in a dataset of {KIND_NAMES[summary.record_kind]}"
                    f" records (the first: {first_record[0]}:{first_record[1]}); chats are "
                    "trained on the assistant's tokens, plain text on every token: prepare them "
                    "as separate datasets",
                )
            if token_ids is None:
                assert isinstance(mask, str)
                if not config.skip_bad:
                    raise DataFileError(path, line_number, mask)
                summary.bad_lines += 1
                if len(summary.bad_line_examples) < MAX_REPORTED_BAD_LINES:
                    summary.bad_line_examples.append(f"{path}:{line_number}: {mask}")
                continue
            assert isinstance(mask, np.ndarray)
            # Position t trains on token t + 1, so the first token's mask never counts.
            had_loss = bool(mask[1:].any())
            if len(token_ids) > max_tokens:
                token_ids, mask = token_ids[:max_tokens], mask[:max_tokens]
                summary.truncated += 1
            if not mask[1:].any():
                if had_loss:
                    summary.truncated_to_no_loss += 1
                else:
                    summary.dropped_without_loss += 1
                continue
            tokens_builder.add_item(torch.from_numpy(token_ids))
            tokens_builder.end_document()
            mask_builder.add_item(torch.from_numpy(mask))
            mask_builder.end_document()
            summary.samples += 1
            summary.tokens += len(token_ids)
            summary.positions += len(token_ids) - 1
            summary.loss_tokens += int(mask[1:].sum())
    tokens_builder.finalize(f"{staging_prefix}.{TOKENS_PREFIX}.idx")
    mask_builder.finalize(f"{staging_prefix}.{LOSS_MASK_PREFIX}.idx")


def _write_rows(
    config: PrepareConfig,
    staging_prefix: Path,
    output_dir: Path,
    dtype: type[np.number],
    summary: PrepareSummary,
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    staged_tokens = IndexedDataset(f"{staging_prefix}.{TOKENS_PREFIX}")
    staged_mask = IndexedDataset(f"{staging_prefix}.{LOSS_MASK_PREFIX}")
    sizes = (staged_tokens.sequence_lengths.astype(np.int64) - 1).tolist()
    rows = pack(sizes, config.seq_length, config.packing)
    if config.shuffle_seed is not None:
        order = np.random.default_rng(config.shuffle_seed).permutation(len(rows))
        rows = [rows[i] for i in order]
    summary.rows = len(rows)
    summary.padding = len(rows) * config.seq_length - summary.positions

    outputs = {
        prefix: IndexedDatasetBuilder(str(output_dir / f"{prefix}.bin"), dtype=row_dtype)
        for prefix, row_dtype in ((TOKENS_PREFIX, dtype), (LOSS_MASK_PREFIX, np.uint8))
    }
    for row in tqdm(rows, unit=" rows", desc="packing", disable=not config.progress):
        for sample in row:
            outputs[TOKENS_PREFIX].add_item(torch.from_numpy(staged_tokens[sample].copy()))
            outputs[LOSS_MASK_PREFIX].add_item(torch.from_numpy(staged_mask[sample].copy()))
        for builder in outputs.values():
            builder.end_document()
    for prefix, builder in outputs.items():
        builder.finalize(str(output_dir / f"{prefix}.idx"))
    del staged_tokens, staged_mask


def _tokenizer_ids(tokenizer: Any) -> tuple[int, int | None]:
    """(pad id for empty row positions, eos id). Any valid id works as padding: it is masked."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (pad if pad is not None else 0), eos


def prepare_dataset(config: PrepareConfig) -> PrepareSummary:
    """Runs the whole pipeline; raises DataFileError on a bad line unless config.skip_bad."""
    if config.seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {config.seq_length}")
    for path in config.inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    output_options = {
        "kind": DATASET_OUTPUT,
        "force": config.overwrite,
        "inputs": [*config.inputs, config.tokenizer, config.chat_template_file],
        "force_flag": "--overwrite",
    }
    output = check_output_target(config.output, **output_options)
    encoder = RecordEncoder(config)  # fails on a bad tokenizer or template before any data
    tokenizer = encoder.tokenizer
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    pad_token_id, eos_token_id = _tokenizer_ids(tokenizer)

    summary = PrepareSummary()
    with atomic_output_dir(output, **output_options) as temporary:
        staging_prefix = temporary / "staging"
        _tokenise_to_staging(config, encoder, staging_prefix, dtype, summary)
        if summary.samples == 0:
            why = [f"{summary.lines} lines", f"{summary.bad_lines} bad"]
            if summary.truncated_to_no_loss:
                why.append(
                    f"{summary.truncated_to_no_loss} lost every trained token to truncation at "
                    f"--seq-length {config.seq_length} (raise it)"
                )
            if summary.dropped_without_loss:
                why.append(f"{summary.dropped_without_loss} without tokens to train on")
            raise ValueError(
                f"no training samples in {', '.join(map(str, config.inputs))} ({', '.join(why)})"
            )
        _write_rows(config, staging_prefix, temporary, dtype, summary)
        for prefix in (TOKENS_PREFIX, LOSS_MASK_PREFIX):
            for suffix in ("bin", "idx"):
                os.remove(f"{staging_prefix}.{prefix}.{suffix}")
        counts = summary.as_dict()
        counts["bad_line_examples"] = summary.bad_line_examples
        write_metadata(
            temporary,
            {
                "seq_length": config.seq_length,
                "packing": config.packing,
                "loss_on": "all tokens" if summary.record_kind == "text" else config.loss_on,
                "record_kind": summary.record_kind,
                "label_shift": "per-sample: tokens = sample[:-1], labels = sample[1:], "
                "loss_mask = mask[1:]",
                "tokenizer": str(Path(config.tokenizer).absolute()),
                "tokenizer_class": type(tokenizer).__name__,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": vocab_size,
                "token_dtype": np.dtype(dtype).name,
                "pad_token_id": pad_token_id,
                "eos_token_id": eos_token_id,
                "chat_template": None
                if summary.record_kind == "text"
                else str(config.chat_template_file or "tokenizer"),
                "chat_template_kwargs": config.template_kwargs,
                "inputs": [str(Path(path).absolute()) for path in config.inputs],
                "input_format": config.input_format,
                "shuffle_seed": config.shuffle_seed,
                "counts": counts,
            },
        )
    return summary
