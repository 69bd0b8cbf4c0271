"""The HF side of a converted checkpoint: tokenizer and generation files carried along.

The directory layout itself (tracker, ``release/``, ``megatron_eaft_model.json``) is
:mod:`megatron_eaft.models.checkpoint_dir` and :mod:`megatron_eaft.models.metadata`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Files carried over from an HF directory so the exported one is usable as is.
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
# Under hf/: HF tensors a family carries along unconverted (a vision tower, MTP heads), as
# safetensors, written back by export byte-identical.
CARRIED_TENSORS_DIR = "carried_tensors"


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy tokenizer / generation files that exist in ``source``; returns their names."""
    copied = []
    for name in HF_SIDE_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
