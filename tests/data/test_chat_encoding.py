"""Assistant-span masks from chat templates: multi-turn, last vs all, tools, three template kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_eaft.data.chat_encoding import (
    ChatEncoder,
    common_prefix_length,
    mask_from_char_spans,
)
from megatron_eaft.data.records import RecordError, parse_record
from tests.data.conftest import GENERATION_TAG_TEMPLATE, THINKING_TEMPLATE

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "I am fine, héllo 世界"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "It is sunny."},
    ]
}


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode(encoded.token_ids[encoded.assistant_mask == 1])


def encode(tokenizer, record: dict, **kwargs):
    return ChatEncoder(tokenizer, **kwargs).encode(parse_record(json.dumps(record)))


def test_tokens_are_the_rendered_chat(tokenizer):
    encoded = encode(tokenizer, MULTI_TURN)
    rendered = tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    assert tokenizer.decode(encoded.token_ids) == rendered
    assert encoded.token_ids.dtype == np.int64 and encoded.assistant_mask.dtype == np.uint8


@pytest.mark.parametrize("template", [None, GENERATION_TAG_TEMPLATE], ids=["chatml", "generation"])
@pytest.mark.parametrize(
    ("loss_on", "expected"),
    [
        ("all", "I am fine, héllo 世界<|im_end|>It is sunny.<|im_end|>"),
        ("last", "It is sunny.<|im_end|>"),
    ],
)
def test_multi_turn(tokenizer, template, loss_on, expected):
    encoded = encode(tokenizer, MULTI_TURN, loss_on=loss_on, chat_template=template)
    assert trained_text(tokenizer, encoded) == expected


@pytest.mark.parametrize(
    ("loss_on", "expected"),
    [
        # The earlier turn as the full chat renders it (no think block), then the final turn
        # with the empty think block the model is trained to write.
        ("all", "I am fine, héllo 世界<|im_end|><think>\n\n</think>\n\nIt is sunny.<|im_end|>"),
        ("last", "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"),
    ],
)
def test_template_that_is_not_prefix_stable(tokenizer, loss_on, expected):
    encoded = encode(tokenizer, MULTI_TURN, loss_on=loss_on, chat_template=THINKING_TEMPLATE)
    assert trained_text(tokenizer, encoded) == expected


def test_tools_reach_the_template_and_are_not_trained(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    record = {
        "tools": tools,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    encoded = encode(tokenizer, record)
    first_trained = int(np.argmax(encoded.assistant_mask))
    assert '"name": "get_weather"' in tokenizer.decode(encoded.token_ids[:first_trained])
    call = '\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>'
    assert trained_text(tokenizer, encoded) == call + "It is sunny.<|im_end|>"
    last = encode(tokenizer, record, loss_on="last")
    assert trained_text(tokenizer, last) == "It is sunny.<|im_end|>"


def test_prompt_response_record(tokenizer):
    record = {"system": "Be brief.", "prompt": "Hello!", "response": "Hi."}
    encoded = encode(tokenizer, record)
    assert trained_text(tokenizer, encoded) == "Hi.<|im_end|>"
    assert tokenizer.decode(encoded.token_ids).startswith("<|im_start|>system\nBe brief.")


def test_trailing_user_turn_is_dropped(tokenizer):
    record = {"messages": [*MULTI_TURN["messages"], {"role": "user", "content": "Bye"}]}
    encoded = encode(tokenizer, record)
    assert "Bye" not in tokenizer.decode(encoded.token_ids)


def test_assistant_first_is_an_error(tokenizer):
    record = {"messages": [{"role": "assistant", "content": "Hi"}]}
    with pytest.raises(RecordError, match="no prompt"):
        encode(tokenizer, record)


def test_template_exception_becomes_a_record_error(tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RecordError, match="roles must alternate"):
        encode(tokenizer, MULTI_TURN, chat_template=template)


def test_template_that_hides_the_answer_is_detected(tokenizer):
    # Renders every assistant turn as a fixed string: no span can contain the real answer.
    template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{{ 'redacted' if m.role == 'assistant' else m.content }}{{ '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    with pytest.raises(RecordError, match="cannot locate assistant message"):
        encode(tokenizer, MULTI_TURN, chat_template=template)


def test_tokenizer_without_template_is_refused(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatEncoder(bare)


def test_mask_includes_tokens_straddling_a_span_edge():
    offsets = np.array([[0, 3], [3, 6], [6, 9], [9, 12]])
    assert mask_from_char_spans(offsets, [(4, 7)], 4).tolist() == [0, 1, 1, 0]
    assert mask_from_char_spans(offsets, [(0, 3), (9, 12)], 4).tolist() == [1, 0, 0, 1]
    assert mask_from_char_spans(offsets, [], 4).tolist() == [0, 0, 0, 0]


@given(st.text(max_size=40), st.text(max_size=40))
def test_common_prefix_length(a, b):
    expected = 0
    while expected < min(len(a), len(b)) and a[expected] == b[expected]:
        expected += 1
    assert common_prefix_length(a, b) == expected
