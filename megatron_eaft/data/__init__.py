"""SFT data: JSONL chats -> packed, loss-masked Megatron indexed datasets, and their reader.

Names are imported on first use, so that `megatron-eaft --help` and the tokenisation helpers
do not pay for torch and Megatron-Core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatEncoder": "chat_encoding",
    "EncodedChat": "chat_encoding",
    "load_tokenizer": "chat_encoding",
    "pack": "packing",
    "pack_first_fit_decreasing": "packing",
    "pack_greedy": "packing",
    "PrepareConfig": "prepare",
    "PrepareSummary": "prepare",
    "prepare_dataset": "prepare",
    "Conversation": "records",
    "DataFileError": "records",
    "RecordError": "records",
    "parse_record": "records",
    "SFTDataset": "sft_dataset",
    "collate_sft_rows": "sft_dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
