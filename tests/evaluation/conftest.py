"""A tiny HF model, a fine-tuned copy as a megatron-eaft checkpoint, and two tiny lm_eval tasks.

Nothing is downloaded: the tokenizer is trained here (the demo's byte-level BPE), the models
are transformers' Qwen3 at a few thousand parameters, and the tasks read local JSONL files.
The fine-tuned model has memorised both tasks' answers, so it scores 100 on each.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before `datasets` is first imported (it reads them once): lm_eval must never reach a hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPITALS = [
    ("capital of France", ["Paris", "Rome", "Oslo"], 0),
    ("capital of Italy", ["Paris", "Rome", "Oslo"], 1),
    ("capital of Norway", ["Paris", "Rome", "Oslo"], 2),
    ("colour of the sky", ["green", "blue", "red"], 1),
]
SUMS = [("two plus two", "four"), ("one plus one", "two"), ("three plus one", "four")]
PROMPT = "Q: {{question}}\\nA:"  # in the YAML: Jinja over each JSONL document


def prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def task_texts() -> list[str]:
    """What the fine-tuned model learns: every prompt followed by its right answer."""
    return [f"{prompt(q)} {choices[a]}\n" for q, choices, a in CAPITALS] + [
        f"{prompt(q)} {answer}\n" for q, answer in SUMS
    ]


def write_tasks(directory: Path) -> Path:
    """tiny_mc (multiple choice, log-likelihood accuracy) and tiny_gen (greedy generation,
    exact match), each a YAML file over a local JSONL file, and tiny_group: a group (as MMLU
    is one) of a copy of tiny_mc."""
    directory.mkdir(parents=True)
    cache = directory / "datasets_cache"
    documents = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in CAPITALS],
        "gen": [{"question": q, "answer": a} for q, a in SUMS],
    }
    for name, rows in documents.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f'dataset_path: json\ntest_split: test\ndoc_to_text: "{PROMPT}"\n'
    for name in ("tiny_mc", "tiny_mc_grouped"):  # the same documents, once inside a group
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\n"
            + common
            + f"dataset_kwargs: {{data_files: {{test: {directory / 'mc.jsonl'}}}, cache_dir: {cache}}}\n"
            "output_type: multiple_choice\n"
            'doc_to_choice: "{{choices}}"\n'
            "doc_to_target: answer\n"
            "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
        )
    (directory / "tiny_group.yaml").write_text(
        "group: tiny_group\ntask: [tiny_mc_grouped]\n"
        "aggregate_metric_list: [{metric: acc, weight_by_size: true}]\n"
    )
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n"
        + common
        + f"dataset_kwargs: {{data_files: {{test: {directory / 'gen.jsonl'}}}, cache_dir: {cache}}}\n"
        "output_type: generate_until\n"
        'doc_to_target: " {{answer}}"\n'
        'generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}\n'
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    return directory


def tiny_models(directory: Path) -> tuple[Path, Path]:
    """(base HF directory, fine-tuned megatron-eaft checkpoint without a tokenizer)."""
    import torch
    import transformers

    from megatron_eaft.convert.engine import import_hf_checkpoint
    from megatron_eaft.demo.pretrain import ModelShape, qwen3_config
    from megatron_eaft.demo.tokenizer import train_tokenizer
    from megatron_eaft.models.checkpoint_dir import HF_FILES_DIR

    texts = task_texts()
    tokenizer = train_tokenizer(texts * 3, 300, directory / "tokenizer")
    shape = ModelShape(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    config = qwen3_config(shape, tokenizer)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    base = directory / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # the loss levels off at ~0.16 (the questions' own entropy) by 120
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned_hf = directory / "tuned_hf"
    model.save_pretrained(tuned_hf)
    tuned = directory / "tuned_megatron"
    import_hf_checkpoint(tuned_hf, tuned, dtype="fp32", progress=False, fsync=False)
    # As `finetune` saves it: no tokenizer in the checkpoint (evaluate takes the base's).
    shutil.rmtree(tuned / HF_FILES_DIR, ignore_errors=True)
    return base, tuned


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; on a busy machine two threads cost ~10x
    (measured: 25 ms vs 318 ms per training step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_eval_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_torch_thread (a session fixture cannot use it)
    try:
        root = tmp_path_factory.mktemp("evaluate")
        base, tuned = tiny_models(root)
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "tuned": tuned, "tasks": write_tasks(root / "tasks")}
