"""Session fixtures: each tiny case is built, saved and imported once and shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_eaft.convert.engine import import_hf_checkpoint
from megatron_eaft.convert.verify import sample_inputs
from tests.convert import tiny_models


@dataclass(frozen=True)
class Converted:
    case: str
    hf_dir: Path
    megatron_dir: Path
    input_ids: torch.Tensor
    hf_logits: torch.Tensor


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Callable[[str], Converted]:
    """`converted(case)`: the case's HF directory, its converted checkpoint and HF logits."""
    cache: dict[str, Converted] = {}

    def get(case: str) -> Converted:
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            model = tiny_models.random_model(tiny_models.hf_config(case))
            hf_dir = tiny_models.save_hf(model, root / "hf")
            megatron_dir = root / "megatron"
            import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
            input_ids = sample_inputs(tiny_models.VOCAB)
            cache[case] = Converted(
                case, hf_dir, megatron_dir, input_ids, tiny_models.logits(model, input_ids)
            )
        return cache[case]

    return get
