"""`megatron-eaft convert import|export|verify`: exit codes, summary lines, error messages."""

from __future__ import annotations

import argparse
import re

import pytest

from megatron_eaft.cli import convert
from megatron_eaft.cli.convert import byte_size
from megatron_eaft.megatron import launcher


def main(argv: list[str]) -> int:
    """The `megatron-eaft` entry point with only this sub-command registered."""
    parser = argparse.ArgumentParser(prog="megatron-eaft")
    convert.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_import_export_and_errors(converted, tmp_path, capsys):
    c = converted("qwen3_moe")
    out = tmp_path / "mg"
    assert (
        main(["convert", "import", "--hf", str(c.hf_dir), "--out", str(out), "--no-progress"]) == 0
    )
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"import: \d+ tensors, [\d.]+ [kMG]B in [\d.]+ s \([\d.]+ GB/s\) -> {out}", line
    )

    assert main(["convert", "import", "--hf", str(c.hf_dir), "--out", str(out)]) == 1
    assert "convert import: error:" in capsys.readouterr().err

    hf_out = tmp_path / "hf"
    args = ["convert", "export", "--megatron", str(out), "--out", str(hf_out), "--no-progress"]
    assert main([*args, "--max-shard-size", "100KB", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("export: ")
    assert (hf_out / "model.safetensors.index.json").is_file()

    assert (
        main(["convert", "export", "--megatron", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    )
    assert "megatron_eaft_model.json is missing" in capsys.readouterr().err


def test_full_disk_and_refused_out_are_one_line(converted, tmp_path, monkeypatch, capsys):
    from tests.convert.test_errors import fill_disk_after

    c = converted("qwen2_tied")
    capsys.readouterr()  # building the fixture's model may print transformers' progress bars
    base = ["convert", "import", "--hf", str(c.hf_dir), "--no-progress", "--force"]
    assert main([*base, "--out", str(c.hf_dir.parent)]) == 1
    assert capsys.readouterr().err == (
        f"convert import: error: {c.hf_dir.parent} contains the input {c.hf_dir}; write a "
        "Megatron checkpoint made by `convert import` elsewhere\n"
    )
    fill_disk_after(monkeypatch, writes=1)
    out = tmp_path / "mg"
    assert main([*base, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convert import: error: no space left on device writing {out}: ")
    assert err.count("\n") == 1


def test_verify_passes_and_fails_on_tolerance(dist, converted, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "run_distributed", dist.run)
    c = converted("qwen2_untied")
    base = ["convert", "verify", "--hf", str(c.hf_dir), "--megatron", str(c.megatron_dir)]
    assert main([*base, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "verify TP2 PP1 EP1: max |diff|" in out and "-> OK" in out
    # Agreement can never reach 2: the verdict and exit code follow the thresholds.
    assert main([*base, "--min-top1", "2"]) == 2
    assert "-> FAILED" in capsys.readouterr().out


def test_byte_sizes():
    assert byte_size("5GB") == 5 * 10**9
    assert byte_size("1.5 MiB") == 3 * 2**19
    assert byte_size("123") == 123
    for bad in ("five", "0", "3XB"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)
