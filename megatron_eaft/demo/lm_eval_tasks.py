"""The demo's knowledge as lm-evaluation-harness tasks, and scoring models on them.

Local YAML tasks over JSONL (nothing downloaded), in the ChatML the demo's tokenizer uses:
``conversions`` (held-out unit conversions: greedy generation, exact match), ``general_mc``
(each general question with its answer and three wrong ones of the same kind: log-likelihood
accuracy) and ``general_qa`` (the general questions: greedy generation, exact match). Both the
demo and the forgetting experiment score their models on them through ``megatron-eaft
evaluate``'s :func:`~megatron_eaft.evaluation.compare.compare_models`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TARGET_TASK = "conversions"
GENERAL_TASKS = ("general_mc", "general_qa")
CHAT_PROMPT = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    from megatron_eaft.outputs import write_text_atomically

    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def _first(items: list, count: int | None) -> list:
    return items if count is None else items[:count]


def _distractors(template: str, entity: str, pool: Sequence[str], k: int = 3) -> list[str]:
    """``template`` (one ``{}``) filled with ``entity``, then with the next ``k`` other
    entities of its category."""
    others = [item for item in pool if item != entity]
    start = pool.index(entity) % max(1, len(others))
    picked = [others[(start + i) % len(others)] for i in range(k)]
    return [template.format(item) for item in (entity, *picked)]


def general_choices() -> list[dict[str, Any]]:
    """Every general question with its answer and three same-category wrong answers (index 0
    is right; lm_eval scores each choice's log-likelihood)."""
    from megatron_eaft.demo.data import _article, _capitalise
    from megatron_eaft.demo.data.facts import (
        ANIMAL_SOUNDS,
        CAPITALS,
        COLOURS,
        DAYS,
        MONTHS,
        OPPOSITES,
    )

    rows = []

    def add(question: str, choices: list[str]) -> None:
        rows.append({"question": question, "choices": choices, "answer": 0})

    cities = [city for _, city in CAPITALS]
    for country, city in CAPITALS:
        add(
            f"What is the capital of {country}?",
            _distractors(f"The capital of {country} is {{}}.", city, cities),
        )
    sounds = sorted({sound for _, sound in ANIMAL_SOUNDS})
    for animal, sound in ANIMAL_SOUNDS:
        a = _article(animal)
        add(
            f"What sound does {a} {animal} make?",
            _distractors(f"{_capitalise(a)} {animal} {{}}.", sound, sounds),
        )
    colours = sorted({colour for _, colour in COLOURS})
    for thing, colour in COLOURS:
        add(
            f"What colour is {thing}?",
            _distractors(f"{_capitalise(thing)} is {{}}.", colour, colours),
        )
    words = [b for _, b in OPPOSITES]
    for a, b in OPPOSITES:
        add(
            f"What is the opposite of {a}?",
            _distractors(f"The opposite of {a} is {{}}.", b, words),
        )
    for i, day in enumerate(DAYS):
        add(
            f"What day comes after {day}?",
            _distractors(f"The day after {day} is {{}}.", DAYS[(i + 1) % 7], list(DAYS)),
        )
    for i, month in enumerate(MONTHS):
        add(
            f"Which month comes after {month}?",
            _distractors(f"The month after {month} is {{}}.", MONTHS[(i + 1) % 12], list(MONTHS)),
        )
    return rows


def write_lm_eval_tasks(
    directory: Path,
    held_out: str,
    target_count: int | None = None,
    general_count: int | None = None,
) -> Path:
    """Local lm_eval tasks (YAML over JSONL): conversions (the first ``target_count``
    held-out questions of the ``held_out`` split; generate + exact match), general_mc
    (log-likelihood over 4 answers) and general_qa (generate + exact match), each on the
    first ``general_count`` general questions (None: all)."""
    from megatron_eaft.demo.data import (
        QUESTION_TEMPLATES,
        domain_qa,
        general_questions,
    )

    directory.mkdir(parents=True, exist_ok=True)
    held_out_qa = domain_qa("eval", held_out)
    # One template per (number, conversion), cycling through the templates.
    per_question = len(QUESTION_TEMPLATES)
    conversions = [
        {"question": qa.question, "answer": qa.answer}
        for index, qa in enumerate(held_out_qa)
        if index % per_question == (index // per_question) % per_question
    ]
    assert len(conversions) == len(held_out_qa) // per_question
    documents = {
        TARGET_TASK: _first(conversions, target_count),
        "general_mc": _first(general_choices(), general_count),
        "general_qa": _first(
            [{"question": qa.question, "answer": qa.answer} for qa in general_questions()],
            general_count,
        ),
    }
    prompt = json.dumps(CHAT_PROMPT.format(question="{{question}}"))
    cache = directory / "datasets_cache"
    for name, rows in documents.items():
        write_jsonl(directory / f"{name}.jsonl", rows)
        head = (
            f"task: {name}\ndataset_path: json\ntest_split: test\n"
            f"dataset_kwargs: {{data_files: {{test: {directory / f'{name}.jsonl'}}}, "
            f"cache_dir: {cache}}}\n"
            f"doc_to_text: {prompt}\ntarget_delimiter: ''\n"
        )
        if name == "general_mc":
            body = (
                "output_type: multiple_choice\n"
                'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
                "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
            )
        else:
            body = (
                "output_type: generate_until\n"
                'doc_to_target: "{{answer}}"\n'
                "generation_kwargs: {until: ['<|im_end|>', '\\n'], max_gen_toks: 24, "
                "do_sample: false}\n"
                "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
            )
        (directory / f"{name}.yaml").write_text(head + body, encoding="utf-8")
    return directory


def score_on_local_tasks(
    models: Sequence[str],
    tasks: Path,
    out: Path,
    batch_size: int,
    log: Callable[[str], None],
) -> tuple[Any, str]:
    """`megatron-eaft evaluate` (``NAME=PATH`` models, the first the base) on the tasks written
    by :func:`write_lm_eval_tasks`, on CPU in fp32; (the comparison, the equivalent command)."""
    from megatron_eaft.evaluation.compare import EvaluationRequest, compare_models
    from megatron_eaft.evaluation.harness import HarnessSettings

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = (
        f"megatron-eaft evaluate {' '.join('--model ' + m for m in models)} --target-tasks "
        f"{TARGET_TASK} --general-tasks {','.join(GENERAL_TASKS)} --include-path {tasks} "
        f"--device cpu --dtype float32 --batch-size {batch_size} --out {out}"
    )
    log(f"   (CLI: {command})")
    comparison = compare_models(
        EvaluationRequest(
            models=list(models),
            target_tasks=[TARGET_TASK],
            general_tasks=list(GENERAL_TASKS),
            include_paths=[tasks],
            out=out,
            settings=HarnessSettings(batch_size=str(batch_size), device="cpu", dtype="float32"),
        ),
        log=lambda line: log(f"   {line}"),
    )
    return comparison, command
