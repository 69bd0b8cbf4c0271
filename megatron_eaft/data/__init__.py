"""SFT data: JSONL chats -> packed, loss-masked Megatron indexed datasets, and their reader.

Megatron-Core is imported only where the indexed format is read or written, so tokenisation
helpers stay cheap to import.
"""

from megatron_eaft.data.chat_encoding import ChatEncoder, EncodedChat, load_tokenizer
from megatron_eaft.data.packing import pack, pack_first_fit_decreasing, pack_greedy
from megatron_eaft.data.prepare import PrepareConfig, PrepareSummary, prepare_dataset
from megatron_eaft.data.records import Conversation, DataFileError, RecordError, parse_record
from megatron_eaft.data.sft_dataset import SFTDataset, collate_sft_rows

__all__ = [
    "ChatEncoder",
    "Conversation",
    "DataFileError",
    "EncodedChat",
    "PrepareConfig",
    "PrepareSummary",
    "RecordError",
    "SFTDataset",
    "collate_sft_rows",
    "load_tokenizer",
    "pack",
    "pack_first_fit_decreasing",
    "pack_greedy",
    "parse_record",
    "prepare_dataset",
]
