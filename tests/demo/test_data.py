"""The demo's generated data and tokenizer: deterministic, correct, split cleanly, ChatML."""

from __future__ import annotations

import json
import re

import pytest

from megatron_eaft.demo import data
from megatron_eaft.demo.tokenizer import IM_END, train_tokenizer


def test_generation_is_deterministic(tmp_path):
    first = data.write_demo_data(tmp_path / "a", general_count=40)
    second = data.write_demo_data(tmp_path / "b", general_count=40)
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    other_seed = data.write_demo_data(tmp_path / "c", general_count=40, seed=1)
    assert other_seed["general"].read_bytes() != first["general"].read_bytes()


def test_domain_answers_are_right_and_held_out_numbers_never_train():
    pattern = re.compile(r"(\d+) (\w+) is (\d+) (\w+)\.")
    factors = {(big, small): factor for big, small, factor in data.CONVERSIONS}
    numbers = {}
    for split in ("train", "eval"):
        numbers[split] = set()
        for qa in data.domain_qa(split):
            n, big, converted, small = pattern.fullmatch(qa.answer).groups()
            assert int(converted) == int(n) * factors[(big, small)]
            assert n in qa.question and big in qa.question and small in qa.question
            numbers[split].add(int(n))
    assert numbers["eval"] == {n for n in data.DOMAIN_NUMBERS if n % 10 == 7}
    assert not numbers["train"] & numbers["eval"]
    with pytest.raises(ValueError, match="split"):
        data.domain_qa("test")


def test_files_are_chat_jsonl_and_small(tmp_path):
    files = data.write_demo_data(tmp_path, general_count=800)
    for name in ("domain_train", "domain_eval"):
        for line in files[name].read_text().splitlines():
            messages = json.loads(line)["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
    documents = data.read_general(files["general"])
    assert len(documents) == 800
    assert any(IM_END in d for d in documents) and any(IM_END not in d for d in documents)
    assert sum(f.stat().st_size for f in files.values()) < 600 * 1024


def test_every_general_question_has_one_answer():
    questions = data.general_questions()
    assert len({qa.question for qa in questions}) == len(questions)
    assert data.QA("What is the capital of France?", "The capital of France is Paris.") in questions
    assert data.QA("What sound does an owl make?", "An owl hoots.") in questions


def test_tokenizer_renders_chatml_and_splits_digits(tmp_path):
    documents = data.general_documents(60)
    chats = [data.as_chat(qa) for qa in data.domain_qa("train")[:200]]
    tokenizer = train_tokenizer(
        documents + [data.chatml(c["messages"]) for c in chats], 400, tmp_path / "tok"
    )
    assert len(tokenizer) == 400
    messages = chats[0]["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == data.chatml(messages)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.tokenize("7000") == ["7", "0", "0", "0"]
    assert tokenizer.eos_token == IM_END
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded.apply_chat_template(messages, tokenize=False) == rendered
