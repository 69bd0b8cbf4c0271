"""Chat template -> token ids plus a mask of the tokens the assistant wrote.

The mask marks what the model must generate at inference time: everything after the
generation prompt of an assistant turn up to and including its end-of-turn token
(``<|im_end|>`` in ChatML), but not the whitespace a template puts after that token (the model
stops at the end-of-turn token and never generates it).

Two ways to find those tokens:

1. Templates with ``{% generation %}`` markers: Hugging Face's own
   ``return_assistant_tokens_mask`` (the template author says exactly which text is generated).
2. Any other template, by rendering prefixes of the conversation. For assistant message i:
   start = where the rendered conversation departs from ``messages[:i]`` rendered with the
   generation prompt; end = the end of ``messages[:i+1]`` rendered alone when that is a prefix
   of the whole rendering. Templates that render a turn differently once later turns exist
   (Qwen3 drops the reasoning of earlier turns and gives only the final turn an empty
   ``<think></think>`` block) fail that test; for them the end is found by appending a probe
   string to the message's content (the first place where the two renderings differ is the
   end of the content) and adding the end-of-turn text the template writes after it.

Either way every span is checked to contain the end of the message's text, so a template that
defeats both methods is reported instead of silently training on the wrong tokens.

Plain-text records (:class:`TextEncoder`) need no template: the text's tokens, the tokenizer's
own special tokens (a BOS where it adds one) and an end-of-text token, all with loss.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from megatron_eaft.data.records import Conversation, PlainText, RecordError

LossOn = Literal["all", "last"]
LOSS_ON_CHOICES: tuple[str, ...] = ("all", "last")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Appended to a message's content to see where the template writes that content. Control
# characters keep it out of any template test on the content (`'</think>' in content`, trim).
_CONTENT_PROBE = "\x01eaft-probe\x01"
# How much of a message's text must appear inside its span for the span to be trusted.
_CONTENT_CHECK_CHARS = 16


@dataclass(frozen=True)
class EncodedChat:
    token_ids: np.ndarray  # int64 [n]
    # uint8 [n]: 1 on tokens of the selected assistant turns (on every token of plain text)
    assistant_mask: np.ndarray


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # invariant: a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def mask_from_char_spans(
    offsets: np.ndarray, spans: list[tuple[int, int]], num_tokens: int
) -> np.ndarray:
    """uint8 [num_tokens]: 1 for every token whose characters overlap one of the spans.

    A token that straddles a span boundary is included: the model has to produce it.
    """
    mask = np.zeros(num_tokens, dtype=np.uint8)
    if not spans or num_tokens == 0:
        return mask
    span_starts = np.array([start for start, _ in spans])
    span_ends = np.array([end for _, end in spans])
    token_starts, token_ends = offsets[:, 0:1], offsets[:, 1:2]
    overlaps = (token_starts < span_ends[None, :]) & (token_ends > span_starts[None, :])
    mask[overlaps.any(axis=1)] = 1
    return mask


class ChatEncoder:
    """Turns conversations into (token ids, assistant mask) with a HF tokenizer's chat template."""

    def __init__(
        self,
        tokenizer: Any,
        loss_on: LossOn = "all",
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"loss_on must be one of {LOSS_ON_CHOICES}, got {loss_on!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer: character offsets "
                "are needed to map assistant text to tokens; give a directory with tokenizer.json"
            )
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError(
                "the tokenizer has no chat template; pass one (--chat-template FILE.jinja)"
            )
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        self._has_generation_tags: dict[str, bool] = {}

    def uses_generation_tags(self, tools: list[dict[str, Any]] | None = None) -> bool:
        # Tokenizers may hold several named templates (e.g. "tool_use"); HF picks one by `tools`.
        template = self.tokenizer.get_chat_template(self.chat_template, tools)
        if template not in self._has_generation_tags:
            self._has_generation_tags[template] = bool(_GENERATION_TAG.search(template))
        return self._has_generation_tags[template]

    def render(
        self,
        conversation: Conversation,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=conversation.tools,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **{**self.template_kwargs, **conversation.template_kwargs},
            )
        except Exception as error:  # jinja errors (raise_exception in templates) and type errors
            raise RecordError(f"chat template failed: {type(error).__name__}: {error}") from None

    def encode(self, conversation: Conversation) -> EncodedChat:
        # Messages after the last assistant turn carry no loss; rendering them only costs tokens.
        assistant_indices = [
            index
            for index, message in enumerate(conversation.messages)
            if message["role"] == "assistant"
        ]
        messages = conversation.messages[: assistant_indices[-1] + 1]
        if assistant_indices[0] == 0:
            raise RecordError("the first message is an assistant message: it has no prompt")
        selected = assistant_indices if self.loss_on == "all" else assistant_indices[-1:]
        full = self.render(conversation, messages)
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        token_ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        # fromiter over the flattened (start, end) pairs: several times faster than asarray
        # on a list of tuples, which showed up in profiles of long chats.
        offsets = np.fromiter(
            itertools.chain.from_iterable(encoding["offset_mapping"]),
            dtype=np.int64,
            count=2 * len(token_ids),
        ).reshape(-1, 2)

        if self.uses_generation_tags(conversation.tools):
            mask = self._generation_tag_mask(conversation, messages, full, offsets)
        else:
            spans = self._prefix_rendering_spans(conversation, messages, full, selected)
            mask = mask_from_char_spans(offsets, spans, len(token_ids))
        if not mask.any():
            raise RecordError("the chat template produced no assistant tokens")
        return EncodedChat(token_ids=token_ids, assistant_mask=mask)

    def _generation_tag_mask(
        self,
        conversation: Conversation,
        messages: list[dict[str, Any]],
        full: str,
        offsets: np.ndarray,
    ) -> np.ndarray:
        try:
            output = self.tokenizer.apply_chat_template(
                messages,
                tools=conversation.tools,
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                **{**self.template_kwargs, **conversation.template_kwargs},
            )
        except Exception as error:
            raise RecordError(f"chat template failed: {type(error).__name__}: {error}") from None
        mask = np.asarray(output["assistant_masks"], dtype=np.uint8)
        if len(mask) != len(offsets):
            raise RecordError("the template's generation mask does not match the tokenisation")
        if self.loss_on == "last":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = self.render(conversation, messages[:last], add_generation_prompt=True)
            last_turn_start = common_prefix_length(full, prompt)
            mask[offsets[:, 1] <= last_turn_start] = 0
        return mask

    def _prefix_rendering_spans(
        self,
        conversation: Conversation,
        messages: list[dict[str, Any]],
        full: str,
        selected: list[int],
    ) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        previous_end = 0
        for index in selected:
            prompt = self.render(conversation, messages[:index], add_generation_prompt=True)
            start = common_prefix_length(full, prompt)
            end = self._turn_end(conversation, messages, full, index)
            while end > start and full[end - 1].isspace():
                end -= 1
            content = (messages[index].get("content") or "").rstrip()
            if (
                start < previous_end
                or end <= start
                or content[-_CONTENT_CHECK_CHARS:] not in full[start:end]
            ):
                raise RecordError(
                    f"cannot locate assistant message {index} in the rendered chat (found "
                    f"{full[start:end][:80]!r}); this chat template is not prefix-stable: use a "
                    "template with {% generation %} markers (--chat-template)"
                )
            spans.append((start, end))
            previous_end = end
        return spans

    def _turn_end(
        self, conversation: Conversation, messages: list[dict[str, Any]], full: str, index: int
    ) -> int:
        through = self.render(conversation, messages[: index + 1])
        if full.startswith(through):
            return len(through)
        probed = [dict(message) for message in messages]
        probed[index]["content"] = (probed[index].get("content") or "") + _CONTENT_PROBE
        content_end_in_full = common_prefix_length(full, self.render(conversation, probed))
        through_probed = self.render(conversation, probed[: index + 1])
        turn_terminator = through[common_prefix_length(through, through_probed) :]
        return content_end_in_full + common_prefix_length(
            turn_terminator, full[content_end_in_full:]
        )


class TextEncoder:
    """Plain text -> its tokens, with the end-of-text (eos) token appended as in pre-training
    data, and loss on all of them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, document: PlainText) -> EncodedChat:
        token_ids = list(self.tokenizer(document.text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not token_ids or token_ids[-1] != eos):
            token_ids.append(eos)
        if not token_ids:
            raise RecordError("the text has no tokens")
        ids = np.asarray(token_ids, dtype=np.int64)
        return EncodedChat(token_ids=ids, assistant_mask=np.ones(len(ids), dtype=np.uint8))


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A HF tokenizer from a local directory; never touches the network."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not os.listdir(path):
        raise ValueError(f"cannot load a tokenizer from {path}: it is empty")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        # transformers' messages name what it tried, not the directory it was given.
        summary = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"cannot load a tokenizer from {path}: {summary}") from error
