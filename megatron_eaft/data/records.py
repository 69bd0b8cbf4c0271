"""JSONL records -> conversations or plain text: format detection and validation.

Three input formats, detected per line unless forced:

* chat: ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]?}`` (the Hugging
  Face chat format; extra message keys such as ``tool_calls``, ``name``, ``tool_call_id`` or
  ``reasoning_content`` are passed to the chat template untouched);
* prompt-response: ``{"prompt": ..., "response": ..., "system": ...?}``, turned into a
  one-turn chat so that both go through the model's chat template;
* plain text: ``{"text": ...}`` (pre-training style documents, e.g. a general-ability
  evaluation set), trained or scored on every token.

Chats (either chat format) and plain text are different kinds of sample (loss on the
assistant's tokens vs on all of them); one dataset holds one kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

InputFormat = Literal["auto", "chat", "prompt-response", "text"]
INPUT_FORMATS: tuple[str, ...] = ("auto", "chat", "prompt-response", "text")
RecordKind = Literal["chat", "text"]


class RecordError(ValueError):
    """A record that cannot be turned into a training sample (the message says why)."""


class DataFileError(ValueError):
    """A bad input line, located by file and line number."""

    def __init__(self, path: str | Path, line_number: int, reason: str) -> None:
        super().__init__(f"{path}:{line_number}: {reason}")
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    # Chat-template variables given per record (e.g. a per-sample "enable_thinking").
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[RecordKind] = "chat"


@dataclass
class PlainText:
    """A document scored on every token (no chat template)."""

    text: str

    kind: ClassVar[RecordKind] = "text"


Record = Conversation | PlainText


# The roles chat templates render (Hugging Face's conventions, as Qwen's and GLM's templates use).
STANDARD_ROLES = ("system", "user", "assistant", "tool")


def check_roles(conversation: Conversation, allowed: tuple[str, ...] = STANDARD_ROLES) -> None:
    """A role outside ``allowed`` is refused: most templates render any role verbatim (or drop
    it), so a misspelt "asistant" would silently train as prompt text."""
    for index, message in enumerate(conversation.messages):
        if message["role"] not in allowed:
            raise RecordError(
                f"messages[{index}] has role {message['role']!r}, not one of "
                f"{', '.join(allowed)} (pass --allow-role {message['role']} if the chat "
                "template knows it)"
            )


def _require_string(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _parse_prompt_response(record: dict[str, Any]) -> Conversation:
    messages: list[dict[str, Any]] = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _require_string(record, "system")})
    messages.append({"role": "user", "content": _require_string(record, "prompt")})
    messages.append({"role": "assistant", "content": _require_string(record, "response")})
    return Conversation(messages=messages)


def _parse_chat(record: dict[str, Any]) -> Conversation:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError('"messages" must be a non-empty list')
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RecordError(f'{where} has no "role" string')
        content = message.get("content")
        # Assistant tool calls may come without text; anything else needs a string.
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise RecordError(f'{where} ({role}) has no "content"')
        if content is not None and not isinstance(content, str):
            raise RecordError(
                f'{where} ({role}): "content" must be a string, got {type(content).__name__}'
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError("no assistant message: nothing to train on")
    tools = record.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools)
    ):
        raise RecordError('"tools" must be a list of objects (JSON schemas)')
    template_kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RecordError('"chat_template_kwargs" must be an object')
    return Conversation(messages=messages, tools=tools or None, template_kwargs=template_kwargs)


def _parse_text(record: dict[str, Any]) -> PlainText:
    text = _require_string(record, "text")
    if not text:
        raise RecordError('"text" is empty')
    return PlainText(text)


def parse_record(line: str | bytes, input_format: InputFormat = "auto") -> Record:
    """One JSONL line -> Conversation or PlainText; raises RecordError saying what is wrong."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RecordError(f"not valid UTF-8: {error}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"invalid JSON: {error}") from None
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    is_chat = "messages" in record
    is_prompt_response = "prompt" in record and "response" in record
    if input_format == "chat" or (input_format == "auto" and is_chat):
        if not is_chat:
            raise RecordError(f'no "messages" key (keys: {sorted(record)})')
        return _parse_chat(record)
    if input_format == "prompt-response" or (input_format == "auto" and is_prompt_response):
        if not is_prompt_response:
            raise RecordError(f'needs "prompt" and "response" keys (keys: {sorted(record)})')
        return _parse_prompt_response(record)
    if input_format == "text" or (input_format == "auto" and "text" in record):
        if "text" not in record:
            raise RecordError(f'no "text" key (keys: {sorted(record)})')
        return _parse_text(record)
    raise RecordError(
        f'unknown record format: expected "messages", "prompt"+"response" or "text" keys, '
        f"got {sorted(record)}"
    )


def iter_lines(paths: list[Path]) -> Iterator[tuple[Path, int, bytes]]:
    """(path, 1-based line number, raw line) for every non-blank line of every file.

    Bytes, so that one badly encoded line is reported by number instead of aborting the read.
    """
    for path in paths:
        with open(path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield path, line_number, line


def count_lines(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += sum(1 for line in handle if line.strip())
    return total
