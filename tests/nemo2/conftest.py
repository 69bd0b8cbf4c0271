"""The NeMo 2 suite runs in its own environment (envs/nemo2, `make test-nemo2`), never skipped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_eaft.megatron import cpu_runtime

cpu_runtime.apply_nemo2_cpu_patches()  # before megatron.core is imported

# Imported, not import-or-skipped: without NeMo this suite fails rather than passing empty.
import nemo.collections.llm  # noqa: E402, F401


@pytest.fixture(scope="session")
def nemo2_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF tokenizer and a NeMo SFT dataset (input/output JSONL) in one folder."""
    from megatron_eaft.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("nemo2")
    rng = random.Random(0)
    rows = {"training": 64, "validation": 8, "test": 8}
    examples = {}
    for split, count in rows.items():
        examples[split] = []
        for _ in range(count):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            examples[split].append({"input": f"add {a} and {b}", "output": f" {a + b}"})
    (root / "data").mkdir()
    for split, items in examples.items():
        lines = "".join(json.dumps(item) + "\n" for item in items)
        (root / "data" / f"{split}.jsonl").write_text(lines)
    texts = [e["input"] + e["output"] for e in examples["training"]]
    train_tokenizer(texts, vocab_size=300, out_dir=root / "tokenizer")
    return root
