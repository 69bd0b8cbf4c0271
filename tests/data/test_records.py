"""JSONL record validation: each bad record says what is wrong."""

from __future__ import annotations

import pytest

from megatron_eaft.data.records import PlainText, RecordError, parse_record


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"body": "hi"}', "unknown record format"),
        ('{"text": 3}', '"text" must be a string'),
        ('{"text": ""}', '"text" is empty'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": ["hi"]}', r"messages\[0\] must be an object"),
        ('{"messages": [{"content": "hi"}]}', r'messages\[0\] has no "role"'),
        ('{"messages": [{"role": "user"}]}', r'messages\[0\] \(user\) has no "content"'),
        ('{"messages": [{"role": "user", "content": 3}]}', '"content" must be a string'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],'
            ' "tools": "x"}',
            '"tools" must be a list',
        ),
        ('{"prompt": "a", "response": 1}', '"response" must be a string'),
        (b'{"prompt": "\xff", "response": "b"}', "not valid UTF-8"),
    ],
)
def test_bad_records(line, message):
    with pytest.raises(RecordError, match=message):
        parse_record(line)


def test_forced_format_names_the_missing_keys():
    with pytest.raises(RecordError, match='no "messages" key'):
        parse_record('{"prompt": "a", "response": "b"}', "chat")
    with pytest.raises(RecordError, match='needs "prompt" and "response"'):
        parse_record('{"messages": []}', "prompt-response")
    with pytest.raises(RecordError, match='no "text" key'):
        parse_record('{"prompt": "a", "response": "b"}', "text")


def test_detection_per_line():
    chat = parse_record(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    )
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    prompt_response = parse_record('{"prompt": "a", "response": "b", "system": "s"}')
    assert [m["role"] for m in prompt_response.messages] == ["system", "user", "assistant"]
    assert prompt_response.messages[-1]["content"] == "b"
    text = parse_record('{"text": "Paris is in France.", "source": "wiki"}')
    assert text == PlainText("Paris is in France.") and text.kind == "text"
    assert chat.kind == prompt_response.kind == "chat"
