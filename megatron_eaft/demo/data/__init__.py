"""The demo's text, generated deterministically from the tables in :mod:`.facts`.

* a general corpus: plain paragraphs stating the facts in several phrasings, and ChatML chats
  asking for them (so the base model knows the chat format and answers confidently);
* a domain SFT set: unit conversions in chat JSONL (``{"messages": [...]}``), with held-out
  numbers for evaluation.

The domain answers start with a number where every general answer starts with a word, and
reuse the general answers' "X is Y." shape: the base model is confidently wrong on some
domain tokens (confident conflicts) and right on others, which is the situation EAFT is for.
Nothing is downloaded; the same seed always gives the same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_eaft.demo.data.facts import (
    ANIMAL_SOUNDS,
    CAPITALS,
    COLOURS,
    DAYS,
    EVERYDAY,
    MONTHS,
    OPPOSITES,
)
from megatron_eaft.outputs import atomic_output_file

CONVERSIONS: tuple[tuple[str, str, int], ...] = (
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("tonnes", "kilograms", 1000),
)
QUESTION_TEMPLATES: tuple[str, ...] = (
    "How many {small} are in {n} {big}?",
    "Convert {n} {big} to {small}.",
    "What is {n} {big} in {small}?",
)
DOMAIN_NUMBERS = range(2, 100)
# Which numbers never appear in training (the evaluation asks about them). The demo holds out
# the numbers ending in 7, so a 7 in the last place is never seen; "mod-7-is-3" holds out 14
# numbers whose last digits all still occur in training.
HELD_OUT_RULES: dict[str, Callable[[int], bool]] = {
    "ends-in-7": lambda number: number % 10 == 7,
    "mod-7-is-3": lambda number: number % 7 == 3,
}
DEFAULT_HELD_OUT = "ends-in-7"


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def general_questions() -> list[QA]:
    """Every general fact as a question with its one expected answer."""
    qa = [
        QA(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS
    ]
    qa += [
        QA(f"What sound does {_article(a)} {a} make?", f"{_capitalise(_article(a))} {a} {s}.")
        for a, s in ANIMAL_SOUNDS
    ]
    qa += [QA(f"What colour is {thing}?", f"{_capitalise(thing)} is {c}.") for thing, c in COLOURS]
    qa += [
        QA(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES
    ]
    qa += [
        QA(f"What day comes after {d}?", f"The day after {d} is {DAYS[(i + 1) % 7]}.")
        for i, d in enumerate(DAYS)
    ]
    qa += [
        QA(f"Which month comes after {m}?", f"The month after {m} is {MONTHS[(i + 1) % 12]}.")
        for i, m in enumerate(MONTHS)
    ]
    return qa


def _fact_sentences(rng: random.Random) -> list[str]:
    """One sentence per fact, each in a randomly chosen phrasing."""
    sentences = []
    for country, city in CAPITALS:
        sentences.append(
            rng.choice(
                (
                    f"The capital of {country} is {city}.",
                    f"{city} is the capital of {country}.",
                    f"{country} has its capital in {city}.",
                    f"Many people in {country} live in {city}, the capital.",
                )
            )
        )
    for animal, sound in ANIMAL_SOUNDS:
        a = _article(animal)
        sentences.append(
            rng.choice(
                (
                    f"{_capitalise(a)} {animal} {sound}.",
                    f"The {animal} {sound} when it wants attention.",
                    f"You can hear {a} {animal} when it {sound}.",
                )
            )
        )
    for thing, colour in COLOURS:
        sentences.append(
            rng.choice(
                (f"{_capitalise(thing)} is {colour}.", f"The colour of {thing} is {colour}.")
            )
        )
    for a, b in OPPOSITES:
        sentences.append(
            rng.choice((f"The opposite of {a} is {b}.", f"{_capitalise(a)} and {b} are opposites."))
        )
    for i, day in enumerate(DAYS):
        following = DAYS[(i + 1) % 7]
        sentences.append(
            rng.choice((f"After {day} comes {following}.", f"The day after {day} is {following}."))
        )
    for i, month in enumerate(MONTHS):
        following = MONTHS[(i + 1) % 12]
        sentences.append(
            rng.choice(
                (f"After {month} comes {following}.", f"The month after {month} is {following}.")
            )
        )
    sentences.extend(EVERYDAY)
    return sentences


def chatml(messages: list[dict[str, str]]) -> str:
    """The ChatML rendering the demo tokenizer's chat template produces (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def general_documents(count: int, seed: int = 0) -> list[str]:
    """``count`` documents: one in three a paragraph of facts, the others chats of 1-3 questions."""
    rng = random.Random(seed)
    questions = general_questions()
    documents = []
    for index in range(count):
        if index % 3 == 0:
            sentences = _fact_sentences(rng)
            documents.append(" ".join(rng.sample(sentences, rng.randint(4, 8))))
        else:
            turns = []
            for qa in rng.sample(questions, rng.randint(1, 3)):
                turns += [
                    {"role": "user", "content": qa.question},
                    {"role": "assistant", "content": qa.answer},
                ]
            documents.append(chatml(turns))
    return documents


def domain_qa(split: str, held_out: str = DEFAULT_HELD_OUT) -> list[QA]:
    """Unit conversions, every question template: ``train`` (the numbers ``held_out``, a name
    in :data:`HELD_OUT_RULES`, keeps for evaluation excluded) or ``eval`` (only those)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if held_out not in HELD_OUT_RULES:
        raise ValueError(f"held_out must be one of {', '.join(HELD_OUT_RULES)}, got {held_out!r}")
    is_held_out = HELD_OUT_RULES[held_out]
    qa = []
    for big, small, factor in CONVERSIONS:
        for n in DOMAIN_NUMBERS:
            if is_held_out(n) != (split == "eval"):
                continue
            answer = f"{n} {big} is {n * factor} {small}."
            for template in QUESTION_TEMPLATES:
                qa.append(QA(template.format(n=n, big=big, small=small), answer))
    return qa


def as_chat(qa: QA) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": qa.question},
            {"role": "assistant", "content": qa.answer},
        ]
    }


def _write_atomically(path: Path, lines: Iterator[str]) -> Path:
    with atomic_output_file(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")
    return path


def write_demo_data(
    directory: Path, *, general_count: int, seed: int = 0, held_out: str = DEFAULT_HELD_OUT
) -> dict[str, Path]:
    """general.jsonl (``{"text": ...}``, one document per line), domain_train.jsonl,
    domain_eval.jsonl; returns their paths."""
    directory = Path(directory)
    rng = random.Random(seed)
    train = domain_qa("train", held_out)
    rng.shuffle(train)
    return {
        "general": _write_atomically(
            directory / "general.jsonl",
            (json.dumps({"text": doc}) for doc in general_documents(general_count, seed)),
        ),
        "domain_train": _write_atomically(
            directory / "domain_train.jsonl", (json.dumps(as_chat(qa)) for qa in train)
        ),
        "domain_eval": _write_atomically(
            directory / "domain_eval.jsonl",
            (json.dumps(as_chat(qa)) for qa in domain_qa("eval", held_out)),
        ),
    }


def read_general(path: Path) -> list[str]:
    return [
        json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()
    ]
