"""prepare-data end to end: packing, truncation, pad mode, bad lines, atomic output, reader."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_eaft.cli.main import main
from megatron_eaft.data.chat_encoding import ChatEncoder
from megatron_eaft.data.prepare import PrepareConfig, prepare_dataset
from megatron_eaft.data.records import DataFileError, parse_record
from megatron_eaft.data.sft_dataset import SFTDataset, collate_sft_rows
from megatron_eaft.outputs import OutputRefusedError

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "packs", "rows"]


def chat(turns: int, answer_words: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    messages = [{"role": "system", "content": "Be nice."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}?"})
        answer = " ".join(rng.choice(WORDS, size=answer_words + turn))
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


RECORDS = [chat(1 + i % 3, 2 + 2 * i % 7, seed=i) for i in range(10)] + [
    {"prompt": "Hello!", "response": "Hi there."},
    {"prompt": "Weather?", "response": "It is sunny.", "system": "Be brief."},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def config_for(tmp_path: Path, tokenizer_dir: Path, inputs: list[Path], **overrides):
    settings = dict(
        inputs=inputs,
        tokenizer=tokenizer_dir,
        output=tmp_path / "out",
        seq_length=192,
        progress=False,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def expected_samples(tokenizer, records, loss_on="all", max_tokens=None):
    """(token ids, mask) per record, encoded directly; the first token's mask bit is dropped
    because no position predicts the first token of a sample."""
    encoder = ChatEncoder(tokenizer, loss_on=loss_on)
    samples = []
    for record in records:
        encoded = encoder.encode(parse_record(json.dumps(record)))
        mask = encoded.assistant_mask[:max_tokens].tolist()
        samples.append((tuple(encoded.token_ids[:max_tokens].tolist()), (0, *mask[1:])))
    return samples


def unpack(dataset: SFTDataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Rebuilds (token ids, mask) per sample from the shifted rows, checking the layout."""
    samples = []
    for row in range(len(dataset)):
        item = dataset[row]
        cu = item["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == dataset.seq_length
        assert item["max_seqlen"] == max(b - a for a, b in itertools.pairwise(cu))
        real = len(dataset.sample_lengths(row))
        for a, b in itertools.pairwise(cu[: real + 1]):
            tokens, labels = item["tokens"][a:b], item["labels"][a:b]
            assert torch.equal(tokens[1:], labels[:-1])  # labels are the next token
            assert torch.equal(item["position_ids"][a:b], torch.arange(b - a))
            ids = (*tokens.tolist(), int(labels[-1]))
            mask = (0, *item["loss_mask"][a:b].to(torch.int64).tolist())
            samples.append((ids, mask))
        padding = slice(cu[real], dataset.seq_length)
        assert not item["loss_mask"][padding].any()
        assert (item["tokens"][padding] == dataset.pad_token_id).all()
    return samples


def test_round_trip_first_fit(tmp_path, tokenizer_dir, tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    summary = prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    assert summary.truncated == 0
    dataset = SFTDataset(tmp_path / "out")

    expected = expected_samples(tokenizer, RECORDS)
    assert sorted(unpack(dataset)) == sorted(expected)
    assert summary.samples == len(RECORDS) and summary.rows == len(dataset) < len(RECORDS)
    assert summary.tokens == sum(len(ids) for ids, _ in expected)
    assert summary.loss_tokens == sum(sum(mask) for _, mask in expected)
    assert summary.truncated == summary.bad_lines == 0
    metadata = dataset.metadata
    assert metadata["packing"] == "first-fit" and metadata["seq_length"] == 192
    assert metadata["token_dtype"] == "uint16" and metadata["vocab_size"] == len(tokenizer)
    assert metadata["counts"]["rows"] == summary.rows
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left behind


def test_trained_positions_predict_assistant_text(tmp_path, tokenizer_dir, tokenizer):
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    data = write_jsonl(tmp_path / "data.jsonl", [record])
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], seq_length=32))
    item = SFTDataset(tmp_path / "out")[0]
    assert tokenizer.decode(item["labels"][item["loss_mask"] == 1]) == "Yo<|im_end|>"
    assert item["loss_mask"].dtype == torch.float32 and item["cu_seqlens"].dtype == torch.int32


def test_truncation_and_samples_left_without_loss(tmp_path, tokenizer_dir, tokenizer):
    long_answer = {"prompt": "Hi", "response": " ".join(WORDS * 4)}
    long_prompt = {"prompt": " ".join(WORDS * 4), "response": "ok"}
    short = {"prompt": "Hi", "response": "ok"}
    data = write_jsonl(tmp_path / "data.jsonl", [long_answer, long_prompt, short])
    summary = prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], seq_length=24))
    assert summary.truncated == 2
    assert summary.truncated_to_no_loss == 1 and summary.dropped_without_loss == 0
    assert summary.samples == 2
    dataset = SFTDataset(tmp_path / "out")
    assert sorted(unpack(dataset)) == sorted(
        expected_samples(tokenizer, [long_answer, short], max_tokens=25)
    )
    assert (
        max(length for row in range(len(dataset)) for length in dataset.sample_lengths(row)) == 25
    )


def test_pad_mode_has_one_sample_per_row(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    summary = prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], packing="pad"))
    dataset = SFTDataset(tmp_path / "out")
    assert summary.rows == len(dataset) == len(RECORDS)
    for row in range(len(dataset)):
        (length,) = dataset.sample_lengths(row)
        assert dataset[row]["cu_seqlens"].tolist() == [0, length - 1, 192]
    assert summary.padding == 192 * len(RECORDS) - summary.positions


def test_greedy_without_shuffle_keeps_input_order(tmp_path, tokenizer_dir, tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    config = config_for(tmp_path, tokenizer_dir, [data], packing="greedy", shuffle_seed=None)
    prepare_dataset(config)
    expected = expected_samples(tokenizer, RECORDS)
    assert unpack(SFTDataset(tmp_path / "out")) == expected


def test_loss_on_last_turn(tmp_path, tokenizer_dir, tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:4])
    summary = prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], loss_on="last"))
    expected = expected_samples(tokenizer, RECORDS[:4], loss_on="last")
    assert summary.loss_tokens == sum(sum(mask[1:]) for _, mask in expected)
    assert SFTDataset(tmp_path / "out").metadata["loss_on"] == "last"


def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, tokenizer_dir):
    lines = [*RECORDS[:3], '{"messages": [', RECORDS[3]]
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataFileError, match=r"data\.jsonl:4: invalid JSON") as caught:
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    assert caught.value.line_number == 4
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_failure_after_staging_leaves_no_output(tmp_path, tokenizer_dir):
    # The bad line comes last, after every good sample has been staged on disk.
    data = write_jsonl(tmp_path / "data.jsonl", [*RECORDS, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataFileError, match=rf"data\.jsonl:{len(RECORDS) + 1}: .*no \"content\""):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl"]


def test_skip_bad_counts_and_reports(tmp_path, tokenizer_dir):
    first = write_jsonl(tmp_path / "a.jsonl", [RECORDS[0], "not json", RECORDS[1]])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x"}, RECORDS[2]])
    config = config_for(tmp_path, tokenizer_dir, [first, second], skip_bad=True)
    summary = prepare_dataset(config)
    assert (summary.lines, summary.samples, summary.bad_lines) == (5, 3, 2)
    assert summary.bad_line_examples[0].startswith(str(tmp_path / "a.jsonl:2: invalid JSON"))
    assert "b.jsonl:1: unknown record format" in summary.bad_line_examples[1]
    text = summary.format(config)
    assert "bad lines skipped: 2" in text and "a.jsonl:2" in text
    assert SFTDataset(tmp_path / "out").metadata["counts"]["bad_lines"] == 2


def test_only_bad_lines_is_an_error(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", ["nope"])
    with pytest.raises(ValueError, match="no training samples"):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], skip_bad=True))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:2])
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    summary = prepare_dataset(
        config_for(tmp_path, tokenizer_dir, [data], packing="pad", overwrite=True)
    )
    assert SFTDataset(tmp_path / "out").metadata["packing"] == "pad" and summary.rows == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl", "out"]


def test_overwrite_replaces_only_a_previous_dataset(tmp_path, tokenizer_dir):
    """--overwrite never deletes an input, a file, or a directory prepare-data did not make."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = write_jsonl(inputs / "data.jsonl", RECORDS[:2])
    (inputs / "unrelated.txt").write_text("keep me")
    regular = tmp_path / "dataset.bin"
    regular.write_text("not a directory")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output, message in (
        (inputs, rf"{inputs} contains the input {data}"),
        (data, rf"{data} is the input {data}"),
        (tokenizer_dir, rf"{tokenizer_dir} is the input {tokenizer_dir}"),
        (regular, rf"{regular} is a file, not a directory"),
        (foreign, rf"{foreign} exists and is not a dataset made by `prepare-data`"),
    ):
        with pytest.raises(OutputRefusedError, match=message):
            prepare_dataset(
                config_for(tmp_path, tokenizer_dir, [data], output=output, overwrite=True)
            )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # A previous dataset with a file added by hand is no longer only a dataset.
    out = tmp_path / "out"
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    (out / "README").write_text("my notes")
    with pytest.raises(OutputRefusedError, match="it holds README"):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], overwrite=True))
    assert (out / "README").read_text() == "my notes"


def test_cli_refusal_is_one_line(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:2])
    arguments = ["prepare-data", "--input", str(data), "--tokenizer", str(tokenizer_dir)]
    arguments += ["--seq-length", "192", "--no-progress", "--overwrite", "--output", str(tmp_path)]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert (
        error == f"prepare-data: error: {tmp_path} contains the input {data}; write a dataset "
        "made by `prepare-data` elsewhere\n"
    )
    assert data.is_file()


def test_empty_tokenizer_directory_is_named(tmp_path):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:1])
    with pytest.raises(ValueError, match=rf"cannot load a tokenizer from {empty}: it is empty"):
        prepare_dataset(config_for(tmp_path, empty, [data]))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"cannot load a tokenizer from {empty}: "):
        prepare_dataset(config_for(tmp_path, empty, [data]))


def test_prepare_removes_what_a_killed_run_of_the_same_output_left(tmp_path, tokenizer_dir, caplog):
    from tests.test_outputs import dead_pid, temporary_of

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:2])
    stale = temporary_of(tmp_path / "out", dead_pid())
    with caplog.at_level(logging.WARNING, logger="megatron_eaft.outputs"):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl", "out"]
    assert f"removed {stale} (1.00 kB) left by a killed write of {tmp_path / 'out'}" in caplog.text


def test_collate_lays_rows_end_to_end(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], seq_length=64))
    dataset = SFTDataset(tmp_path / "out")
    rows = [dataset[0], dataset[1]]
    batch = collate_sft_rows(rows)
    assert batch["tokens"].shape == batch["loss_mask"].shape == (2, 64)
    expected = torch.cat([rows[0]["cu_seqlens"], rows[1]["cu_seqlens"][1:] + 64])
    assert torch.equal(batch["cu_seqlens"], expected) and batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["max_seqlen"]) == max(rows[0]["max_seqlen"], rows[1]["max_seqlen"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_sft_rows)
    assert next(iter(loader))["tokens"].shape == (2, 64)


def test_worker_processes_give_identical_output(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS * 3)
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], output=tmp_path / "one"))
    prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], output=tmp_path / "two", workers=2))
    for name in ("tokens.bin", "tokens.idx", "loss_mask.bin", "loss_mask.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


TEXTS = [{"text": " ".join(WORDS[i:] + WORDS[:i])} for i in range(6)]


def test_plain_text_has_loss_on_every_token_without_a_chat_template(tmp_path, tokenizer):
    # A tokenizer without a chat template: plain text does not need one.
    bare = tmp_path / "bare_tokenizer"
    tokenizer.save_pretrained(bare)
    config_file = bare / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings.pop("chat_template", None)
    config_file.write_text(json.dumps(settings))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "general.jsonl", TEXTS)
    config = config_for(tmp_path, bare, [data], seq_length=64, packing="greedy", shuffle_seed=None)
    summary = prepare_dataset(config)
    expected = [
        (*tokenizer(record["text"])["input_ids"], tokenizer.eos_token_id) for record in TEXTS
    ]
    samples = unpack(SFTDataset(tmp_path / "out"))
    assert [ids for ids, _ in samples] == expected
    assert all(mask == (0,) + (1,) * (len(ids) - 1) for ids, mask in samples)
    assert summary.loss_tokens == summary.positions and summary.record_kind == "text"
    assert "loss on every token (plain text)" in summary.format(config)
    metadata = SFTDataset(tmp_path / "out").metadata
    assert metadata["record_kind"] == "text" and metadata["loss_on"] == "all tokens"
    # ... while a chat record needs the template, and says so with its line.
    chats = write_jsonl(tmp_path / "chats.jsonl", RECORDS[:1])
    with pytest.raises(DataFileError, match=r"chats\.jsonl:1: a chat record, but .*chat template"):
        prepare_dataset(config_for(tmp_path, bare, [chats], output=tmp_path / "chats_out"))


@pytest.mark.parametrize("skip_bad", [False, True])
def test_chats_and_plain_text_in_one_dataset_is_an_error(tmp_path, tokenizer_dir, skip_bad):
    data = write_jsonl(tmp_path / "mixed.jsonl", [TEXTS[0], TEXTS[1], RECORDS[0], "not json"])
    with pytest.raises(
        DataFileError,
        match=r"mixed\.jsonl:3: a chat record in a dataset of plain-text records "
        r"\(the first: .*mixed\.jsonl:1\)",
    ):
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], skip_bad=skip_bad))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mixed.jsonl"]


def test_cli(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:3])
    out = tmp_path / "cli_out"
    arguments = ["prepare-data", "--input", str(data), "--tokenizer", str(tokenizer_dir)]
    arguments += ["--seq-length", "192", "--no-progress"]
    assert main([*arguments, "--output", str(out), "--pad", "--loss-on", "last"]) == 0
    printed = capsys.readouterr().out
    assert "3 lines -> 3 samples in 3 rows of 192 (pad packing, loss on last" in printed
    assert SFTDataset(out).metadata["loss_on"] == "last"

    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "{"])
    arguments[2] = str(bad)
    assert main([*arguments, "--output", str(tmp_path / "bad_out")]) == 1
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()

    # A forced --format text reads the text key of every line (extra keys are ignored).
    texts = write_jsonl(tmp_path / "texts.jsonl", [{**TEXTS[0], "messages": "not a chat"}])
    arguments[2] = str(texts)
    assert main([*arguments, "--output", str(tmp_path / "text_out"), "--format", "text"]) == 0
    assert "loss on every token (plain text)" in capsys.readouterr().out


def test_a_row_too_short_for_any_answer_is_blamed_on_truncation(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:3])
    with pytest.raises(ValueError) as error:
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data], seq_length=1))
    message = str(error.value)
    assert "3 lost every trained token to truncation at --seq-length 1" in message
    assert "without tokens to train on" not in message


def test_an_unknown_chat_role_is_a_bad_line_unless_allowed(tmp_path, tokenizer_dir):
    odd = {"messages": [{"role": "asistant", "content": "typo"}, *RECORDS[0]["messages"][1:]]}
    data = write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], odd])
    with pytest.raises(DataFileError) as error:
        prepare_dataset(config_for(tmp_path, tokenizer_dir, [data]))
    assert error.value.line_number == 2 and "'asistant'" in str(error.value)
    assert "--allow-role asistant" in str(error.value)
    summary = prepare_dataset(
        config_for(tmp_path, tokenizer_dir, [data], extra_roles=("asistant",), overwrite=True)
    )
    assert summary.samples == 2
