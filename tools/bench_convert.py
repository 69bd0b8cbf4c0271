"""Benchmark `convert import` on a synthetic checkpoint with a real model's shapes.

Writes an HF directory (config.json + sharded safetensors) with the per-layer and embedding
shapes of ``--model`` (Qwen3-32B, or Qwen3.5-27B's language model: Gated-DeltaNet layers and
gated full attention every 4th layer) but only ``--layers`` layers, the tensor table taken
from the family's own conversion plan, then measures, each in a fresh process and
alternating ``--repeats`` times:

* ``cp -r`` of the HF directory, followed by fsync of every copied file (the baseline);
* ``import_hf_checkpoint`` of the same directory (which fsyncs what it writes), with the
  process's peak resident memory;
* ``export_megatron_checkpoint`` back to HF, for reference (a few tensors are compared
  with the originals after the first round trip).

Reported: import throughput as a ratio to cp's (goal >= 0.5; the median of the per-run
ratios, cp and import of a run running back to back under the same disk load) and import peak
RSS as a ratio to the largest tensor (goal <= 3). Printed and written as JSON.

    python tools/bench_convert.py --model qwen3.5-27b --layers 4 --out bench_out/bench_convert.json

``--shrink N`` divides every width (hidden, MLP, vocab, head sizes) by N, keeping the layer
pattern: a quick smoke run of the whole benchmark, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Qwen3-32B (config.json of Qwen/Qwen3-32B).
QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}

# Qwen3.5-27B's language model as `Qwen3_5ForCausalLM` (the published checkpoint is the
# vision-language `Qwen3_5ForConditionalGeneration`; its text tensors have these shapes under
# `model.language_model.`). Attention, MLP, vocab and RoPE: the Megatron arguments of slime's
# scripts/models/qwen3.5-27B.sh (checked there against config.json) and the Qwen3.5-27B model
# cards; 16 x (3 GDN + 1 attention) = 64 layers: Megatron-Bridge 0.6.2's Qwen35Bridge. The
# Gated-DeltaNet widths are those of Qwen/Qwen3.6-27B's config.json (the same architecture,
# model_type qwen3_5); no Qwen3.5-27B config.json itself was at hand.
QWEN3_5_27B = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "vocab_size": 248320,
    "hidden_size": 5120,
    "intermediate_size": 17408,
    "num_attention_heads": 24,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 48,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "attn_output_gate": True,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class BenchModel:
    label: str
    config: dict[str, Any]
    # Width fields --shrink divides; the layer pattern is left alone.
    widths: tuple[str, ...]
    # Tensors compared after the first round trip, one per kind of transform.
    spot_checks: tuple[str, ...]
    # Fewest layers that hold every kind of layer.
    min_layers: int = 1


MODELS = {
    "qwen3-32b": BenchModel(
        "Qwen3-32B",
        QWEN3_32B,
        ("hidden_size", "intermediate_size", "vocab_size", "head_dim"),
        (
            "model.layers.0.self_attn.q_proj.weight",  # through the QKV interleave
            "model.layers.0.mlp.up_proj.weight",  # file to file, second half of fc1
            "model.norm.weight",
        ),
    ),
    "qwen3.5-27b": BenchModel(
        "Qwen3.5-27B",
        QWEN3_5_27B,
        (
            "hidden_size",
            "intermediate_size",
            "vocab_size",
            "head_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
        ),
        (
            "model.layers.0.linear_attn.in_proj_qkv.weight",  # row sections, three keys
            "model.layers.0.linear_attn.conv1d.weight",
            "model.layers.0.linear_attn.norm.weight",  # the zero-centred norm offset
            "model.layers.3.self_attn.q_proj.weight",  # the gated QKV interleave
            "model.layers.3.mlp.up_proj.weight",
            "model.norm.weight",
        ),
        min_layers=QWEN3_5_27B["full_attention_interval"],
    ),
}


def bench_config(model: BenchModel, layers: int, shrink: int = 1) -> dict[str, Any]:
    """The HF config.json of the synthetic checkpoint: ``layers`` layers, widths / ``shrink``."""
    if layers < model.min_layers:
        raise ValueError(
            f"{model.label} needs --layers >= {model.min_layers} to hold every kind of layer"
        )
    config = {**model.config, "num_hidden_layers": layers}
    for field in model.widths:
        if config[field] % shrink:
            raise ValueError(f"--shrink {shrink} does not divide {field} {config[field]}")
        config[field] //= shrink
    return config


# Runs in a child process so its peak RSS is the conversion's alone. VmHWM is the high-water
# mark of this process image (ru_maxrss would carry over the parent's from before exec).
CHILD = r"""
import json, sys, time
from megatron_eaft.convert.engine import {function}

def high_water_bytes():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

baseline = high_water_bytes()
start = time.perf_counter()
summary = {function}(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "bytes": summary.bytes, "tensors": summary.tensors,
                  "peak_rss": high_water_bytes(), "baseline_rss": baseline}}))
"""


def synthetic_checkpoint(
    directory: Path, config: dict[str, Any], shard_bytes: int
) -> tuple[int, int]:
    """Write the HF directory for ``config`` with every tensor its family's conversion plan
    reads; returns (total tensor bytes, largest tensor bytes)."""
    from megatron_eaft.convert.engine import plan_conversion
    from megatron_eaft.convert.hf_io import PlannedTensor, SafetensorsShardWriter, plan_shards
    from megatron_eaft.models.families import family_for_hf_config

    plan = plan_conversion(family_for_hf_config(config), config)
    planned = [
        PlannedTensor(name, torch.bfloat16, shape)
        for unit in plan.units()
        for name, shape in zip(unit.hf_names, unit.hf_shapes, strict=True)
    ]
    directory.mkdir(parents=True)
    writer = SafetensorsShardWriter(directory, plan_shards(planned, shard_bytes), fsync=True)
    # Random-looking but cheap: one random block tiled over each tensor.
    noise = torch.randn(1 << 20)
    block = noise.to(torch.bfloat16)
    # Norm weights as trained models have them, near 1: a zero-centred norm is stored as
    # w - 1, which bf16 holds exactly for w in [0.5, 2] (not for N(0, 1) values near 0).
    norm_block = (1 + 0.1 * noise).clamp(0.5, 1.5).to(torch.bfloat16)
    for tensor in planned:
        numel = tensor.nbytes // 2
        source = norm_block if len(tensor.shape) == 1 and "norm" in tensor.name else block
        data = source.repeat(-(-numel // source.numel()))[:numel].reshape(tensor.shape)
        writer.write(tensor.name, data)
        del data
    writer.finish()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.nbytes for t in planned), max(t.nbytes for t in planned)


def spot_check(hf_dir: Path, exported_dir: Path, names: tuple[str, ...]) -> None:
    """The round trip returned a few of the tensors bit-exact (the tests cover all of them)."""
    from megatron_eaft.convert.hf_io import SafetensorsReader

    with SafetensorsReader(hf_dir) as before, SafetensorsReader(exported_dir) as after:
        for name in names:
            if not torch.equal(before.read(name), after.read(name)):
                raise AssertionError(f"{name} changed in the round trip")


def timed_cp(source: Path, target: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    for path in target.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def run_child(function: str, source: Path, target: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(function=function), str(source), str(target)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="qwen3-32b", help="shapes (default qwen3-32b)"
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument(
        "--shrink", type=int, default=1, help="divide every width by this (smoke runs; default 1)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs (default 3)")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/bench_convert"), help="scratch directory"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_convert.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    model = MODELS[args.model]
    try:
        config = bench_config(model, args.layers, args.shrink)
    except ValueError as error:
        parser.error(str(error))

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    hf_dir = args.workdir / "hf"
    start = time.perf_counter()
    total_bytes, largest = synthetic_checkpoint(hf_dir, config, 5 * 10**9)
    shapes = model.label + (f" / {args.shrink}" if args.shrink > 1 else "")
    print(
        f"synthetic {shapes}-shaped checkpoint: {args.layers} layers, {total_bytes / 1e9:.2f} GB, "
        f"largest tensor {largest / 1e9:.2f} GB, written in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    file_bytes = sum(p.stat().st_size for p in hf_dir.iterdir())
    cp_seconds, imports, exports = [], [], []
    for repeat in range(args.repeats):
        cp_dir, mg_dir, out_dir = (args.workdir / f"{n}{repeat}" for n in ("cp", "mg", "export"))
        # Alternate which goes first, so neither always finds the source in the page cache.
        if repeat % 2:
            imports.append(run_child("import_hf_checkpoint", hf_dir, mg_dir))
        cp_seconds.append(timed_cp(hf_dir, cp_dir))
        shutil.rmtree(cp_dir)
        if not repeat % 2:
            imports.append(run_child("import_hf_checkpoint", hf_dir, mg_dir))
        exports.append(run_child("export_megatron_checkpoint", mg_dir, out_dir))
        if repeat == 0:
            spot_check(hf_dir, out_dir, model.spot_checks)
        shutil.rmtree(out_dir)
        shutil.rmtree(mg_dir)
        print(
            f"run {repeat}: cp {file_bytes / cp_seconds[-1] / 1e9:.3f} GB/s, import "
            f"{imports[-1]['bytes'] / imports[-1]['seconds'] / 1e9:.3f} GB/s "
            f"(peak RSS {imports[-1]['peak_rss'] / 1e9:.2f} GB), export "
            f"{exports[-1]['bytes'] / exports[-1]['seconds'] / 1e9:.3f} GB/s",
            flush=True,
        )

    cp_gbps = file_bytes / statistics.median(cp_seconds) / 1e9
    import_gbps = total_bytes / statistics.median(r["seconds"] for r in imports) / 1e9
    # Each run's cp and import ran back to back, under the same disk load: their ratio is the
    # robust number on a shared machine, the medians of the separate rates are not.
    run_ratios = [
        (total_bytes / r["seconds"]) / (file_bytes / c)
        for r, c in zip(imports, cp_seconds, strict=True)
    ]
    export_gbps = total_bytes / statistics.median(r["seconds"] for r in exports) / 1e9
    peak_rss = statistics.median(r["peak_rss"] for r in imports)
    baseline_rss = statistics.median(r["baseline_rss"] for r in imports)
    report = {
        "model": f"{shapes} shapes",
        "layers": args.layers,
        "shrink": args.shrink,
        "tensor_bytes": total_bytes,
        "largest_tensor_bytes": largest,
        "repeats": args.repeats,
        "cp_gb_per_s": round(cp_gbps, 4),
        "import_gb_per_s": round(import_gbps, 4),
        "export_gb_per_s": round(export_gbps, 4),
        "import_to_cp_throughput": round(statistics.median(run_ratios), 3),
        "import_to_cp_throughput_per_run": [round(r, 3) for r in run_ratios],
        "import_peak_rss_bytes": peak_rss,
        "import_baseline_rss_bytes": baseline_rss,
        "import_peak_rss_to_largest_tensor": round(peak_rss / largest, 3),
        "goals": {"import_to_cp_throughput": ">= 0.5", "import_peak_rss_to_largest_tensor": "<= 3"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    print(
        f"import {import_gbps:.3f} GB/s, cp {cp_gbps:.3f} GB/s (medians); import / cp per run "
        f"{report['import_to_cp_throughput_per_run']} -> median "
        f"{report['import_to_cp_throughput']:.2f}; export {export_gbps:.3f} GB/s; import peak RSS "
        f"{peak_rss / 1e9:.2f} GB = {report['import_peak_rss_to_largest_tensor']:.2f} x the "
        f"largest tensor ({largest / 1e9:.2f} GB; {baseline_rss / 1e9:.2f} GB of it is the "
        "Python + torch baseline)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
