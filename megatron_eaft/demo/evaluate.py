"""What the demo measures on HF checkpoints with transformers: answers, accuracy, general loss."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_eaft.demo.data import QA


def load_model(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, local_files_only=True
    )
    return model.eval(), tokenizer


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to single-turn chat questions (batched, left-padded)."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions[start : start + batch_size]
        ]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        answers += [
            text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ]
    return answers


def accuracy(model: Any, tokenizer: Any, qa: Sequence[QA]) -> tuple[float, list[str]]:
    """Fraction of exact-match greedy answers, and the answers."""
    # Room for the longest expected answer and its end-of-turn token, and no more: a model
    # that never stops costs a few tokens, not a page.
    longest = max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in qa)
    answers = generate_answers(
        model, tokenizer, [item.question for item in qa], max_new_tokens=longest + 2
    )
    correct = sum(answer == item.answer for answer, item in zip(answers, qa, strict=True))
    return correct / len(qa), answers


def mean_token_loss(
    model: Any, tokenizer: Any, documents: Sequence[str], batch_size: int = 32
) -> float:
    """Mean next-token cross-entropy over the documents' tokens (a forgetting measure)."""
    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    for start in range(0, len(documents), batch_size):
        encoded = tokenizer(
            list(documents[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        with torch.no_grad():
            logits = model(**encoded).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total += float(losses)
        count += int((targets != -100).sum())
    return total / count if count else float("nan")


def answer_loss(model: Any, tokenizer: Any, qa: Sequence[QA], batch_size: int = 32) -> float:
    """Mean cross-entropy per answer token (the answer and its end-of-turn token), given the
    question as a chat prompt: the same tokens prepare-data's loss mask trains on.

    Exact match is all or nothing; this says how far a model is from the answers when it gets
    none of them right, and it is measured the same way for the base model and the fine-tunes.
    """
    total, count = 0.0, 0
    for start in range(0, len(qa), batch_size):
        rows = []
        for item in qa[start : start + batch_size]:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": item.question}],
                tokenize=False,
                add_generation_prompt=True,
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids, [*answer_ids, tokenizer.eos_token_id]))
        width = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt_ids, answer_ids) in enumerate(rows):
            ids = prompt_ids + answer_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, len(prompt_ids) : len(ids)] = torch.tensor(answer_ids)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            )
        )
        count += int((targets != -100).sum())
    return total / count if count else float("nan")
