"""Scalar series of a training run, read from its TensorBoard directory or its JSONL metrics file.

Both are what `megatron-eaft finetune` writes (``logging.tensorboard_dir`` and
``logging.metrics_file``); TensorBoard directories written by Megatron-LM's ``pretrain`` with
the EAFT forward step carry the same tags (``lm loss``, ``eaft loss``, ``eaft/...``).
A series is a list of ``(iteration, value)`` sorted by iteration.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

Series = list[tuple[int, float]]


class RunLogError(ValueError):
    """A run log cannot be read; the message names the file (and line)."""


def read_metrics_jsonl(path: str | os.PathLike) -> dict[str, Series]:
    """Series from the trainer's metrics file: ``{"iteration", "loss": {key: value}, ...}`` lines.

    Evaluation lines (``{"iteration", "eval": {key: value}}``) become ``eval/<key>``; the
    learning rate and gradient norm become ``learning-rate`` and ``grad-norm``. A run resumed
    into the same file repeats iterations: the last value wins.
    """
    path = Path(path)
    series: dict[str, dict[int, float]] = {}

    def add(key: str, iteration: int, value: object) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            series.setdefault(key, {})[iteration] = float(value)

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RunLogError(f"{path}: no such metrics file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunLogError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise RunLogError(f"{path}:{number}: expected an object with an integer 'iteration'")
        iteration = record["iteration"]
        for section, prefix in (("loss", ""), ("eval", "eval/")):
            values = record.get(section, {})
            if not isinstance(values, dict):
                raise RunLogError(f"{path}:{number}: '{section}' must be an object")
            for key, value in values.items():
                add(prefix + key, iteration, value)
        add("learning-rate", iteration, record.get("learning_rate"))
        add("grad-norm", iteration, record.get("grad_norm"))
    if not series:
        raise RunLogError(f"{path}: no metrics found")
    return {key: sorted(points.items()) for key, points in series.items()}


def read_tensorboard(path: str | os.PathLike) -> dict[str, Series]:
    """Every scalar tag of the event files directly inside ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    if not any(p.name.startswith("events.out.tfevents") for p in path.iterdir()):
        raise RunLogError(f"{path}: no TensorBoard event files (events.out.tfevents.*)")
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = {int(event.step): float(event.value) for event in accumulator.Scalars(tag)}
        series[tag] = sorted(points.items())
    if not series:
        raise RunLogError(f"{path}: the event files hold no scalars")
    return series


def read_run_log(path: str | os.PathLike) -> dict[str, Series]:
    """A TensorBoard directory or a JSONL metrics file, whichever ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return read_tensorboard(path)
    if path.is_file():
        return read_metrics_jsonl(path)
    raise RunLogError(f"{path}: neither a TensorBoard directory nor a metrics file")


def last_value(series: Series) -> float:
    return series[-1][1] if series else math.nan
