"""Train-step time of EAFT against plain SFT on the same model, in one run.

One Trainer (model, DDP, Megatron optimizer) takes full training steps (forward, backward,
optimizer) on the same random micro-batches, cycling through the loss configurations so that
drift in machine load hits all of them alike:

* ``sft``: Megatron-Core's own vocab-parallel cross-entropy, untouched (kind sft, no
  diagnostics): the baseline;
* ``eaft``: EAFT with the paper's top-20 entropy;
* ``eaft-exact``: EAFT with the exact full-vocabulary entropy.

The model is a random-initialised Qwen3-style decoder whose vocabulary / hidden ratio is a real
one (Qwen3-0.6B's 151936 / 1024 by default) with few layers, so the output layer and the loss
weigh in the step as they do in small models (the worst case for a loss's overhead). Prints a
table and writes JSON (median ms per step and the ratio to sft).

Runs as one process (CPU or one GPU); ``--nproc N`` runs N gloo ranks on this machine, and
under torchrun / srun it uses the launcher's ranks. ``--tp`` sets tensor parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

LOSSES: dict[str, dict[str, Any]] = {
    "sft": {"kind": "sft", "diagnostics": False},
    "eaft": {"kind": "eaft", "entropy": "topk", "topk": 20},
    "eaft-exact": {"kind": "eaft", "entropy": "exact"},
}


def qwen3_config(args: argparse.Namespace) -> dict[str, Any]:
    """Qwen3-0.6B's shapes (vocab, hidden, heads, head_dim, ffn, tied) with args.layers layers."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
    }


def random_microbatches(args: argparse.Namespace, count: int, device) -> list[dict]:
    generator = torch.Generator().manual_seed(1234)
    shape = (args.micro_batch_size, args.seq_length)
    batches = []
    for _ in range(count):
        batches.append(
            {
                "tokens": torch.randint(0, args.vocab, shape, generator=generator).to(device),
                "labels": torch.randint(0, args.vocab, shape, generator=generator).to(device),
                "loss_mask": (torch.rand(shape, generator=generator) > 0.2).float().to(device),
                "position_ids": torch.arange(args.seq_length).expand(shape).contiguous().to(device),
            }
        )
    return batches


def bench(args: argparse.Namespace, hf_config_path: str) -> dict[str, Any] | None:
    """Runs on every rank; returns the measurements on the last rank."""
    from megatron_eaft.megatron.loss import EAFTForwardStep
    from megatron_eaft.ops import EAFTConfig
    from megatron_eaft.train.config import config_from_dict
    from megatron_eaft.train.trainer import Trainer

    world_size = torch.distributed.get_world_size()
    config = config_from_dict(
        {
            "model": {
                "hf_config": hf_config_path,
                "dtype": args.dtype,
                "transformer_impl": args.transformer_impl,
            },
            "data": {
                "micro_batch_size": args.micro_batch_size,
                "global_batch_size": args.micro_batch_size
                * args.microbatches
                * (world_size // args.tp),
            },
            "train": {"iterations": args.warmup + args.steps},
            "parallel": {"tensor": args.tp},
            "optimizer": {"lr": 1e-6},
        }
    )
    trainer = Trainer(config)
    trainer.build_scheduler(args.warmup + args.steps)
    steps = {name: EAFTForwardStep(EAFTConfig(**values)) for name, values in LOSSES.items()}
    microbatches = random_microbatches(args, args.microbatches, trainer.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for round_index in range(args.warmup + args.steps):
        # Rotate the order every round: no configuration always runs first.
        names = list(steps)
        names = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in names:
            trainer.forward_step = steps[name]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record = trainer.train_step(microbatches, args.seq_length)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_index >= args.warmup:
                times[name].append(record.seconds)
            if record.reports:
                losses[name] = record.value("lm loss")
    trainer.close()
    if torch.distributed.get_rank() != world_size - 1:
        return None
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "tensor_parallel": args.tp,
        "transformer_impl": trainer.transformer_impl,
        "model": qwen3_config(args),
        "dtype": args.dtype,
        "tokens_per_step": args.micro_batch_size
        * args.microbatches
        * args.seq_length
        * (world_size // args.tp),
        "timed_steps": args.steps,
        "ms_per_step": {name: [1000.0 * t for t in values] for name, values in times.items()},
        "median_ms": {name: 1000.0 * value for name, value in median.items()},
        "ratio_to_sft": {name: value / median["sft"] for name, value in median.items()},
        "lm_loss_last_step": losses,
    }


def _bench_in_worker(args: argparse.Namespace, hf_config_path: str) -> dict[str, Any] | None:
    return bench(args, hf_config_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=1, help="per data-parallel rank")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--transformer-impl", default="auto")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="local gloo ranks (CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loss")
    parser.add_argument("--out", type=Path, default=Path("bench_step.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hf_config_path = os.path.join(tmp, "config.json")
        Path(hf_config_path).write_text(json.dumps(qwen3_config(args)), encoding="utf-8")
        if "WORLD_SIZE" in os.environ or args.nproc == 1:
            from megatron_eaft.launch import setup_launch_env

            if "WORLD_SIZE" not in os.environ:  # a lone local process: any free port will do
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
            from megatron_eaft.megatron import cpu_runtime

            setup_launch_env()
            cpu_runtime.init_process_group_from_env()
            try:
                result = bench(args, hf_config_path)
            finally:
                cpu_runtime.destroy_parallel()
                torch.distributed.destroy_process_group()
        else:
            from megatron_eaft.megatron.launcher import run_distributed

            result = run_distributed(
                _bench_in_worker, args.nproc, args, hf_config_path, timeout=3600
            )[-1]
    if result is None:
        return 0
    print(
        f"train step, {result['tokens_per_step']} tokens, vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.layers} layers, TP {args.tp}, {result['dtype']}, {result['device']}"
    )
    print(f"{'loss':<12} {'median ms':>10} {'ratio':>7}")
    for name, ms in result["median_ms"].items():
        print(f"{name:<12} {ms:10.1f} {result['ratio_to_sft'][name]:7.3f}")
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
