"""Qwen3.5 / Qwen3.5-MoE / GLM-4.7-Flash full SFT in Megatron-Bridge with EAFT, from our conversion.

Megatron-Bridge 0.6 converts these models (``AutoBridge``) but ships no SFT recipe for them
(only Qwen3.5 pretraining configs). This script is the SFT recipe Bridge's Qwen3 ones are:
Bridge's shared SFT base (``_sft_common()``: optimizer, cosine schedule, SFT data, logging)
with the model provider ``AutoBridge`` builds from the HF config, started from the
checkpoint ``megatron-eaft convert import`` wrote:

    megatron-eaft convert import --hf /models/Qwen3.5-27B --out /ckpt/qwen3.5-27b \
        --transformer-impl transformer_engine --dtype bf16
    torchrun --nproc-per-node 8 examples/bridge/autobridge_eaft_sft.py --hf /models/Qwen3.5-27B \
        --megatron-checkpoint /ckpt/qwen3.5-27b --save /ckpt/qwen3.5-27b-eaft --tp 8 \
        --dataset-root /data/sft --eaft-kind eaft
    megatron-eaft convert export --megatron /ckpt/qwen3.5-27b-eaft --out /models/Qwen3.5-27B-eaft

``--hf`` (a local directory or a hub id) gives the model config and the tokenizer; the
weights come from ``--megatron-checkpoint`` (``checkpoint.pretrained_checkpoint``). MoE models
at ``--tp`` above 1 need ``--sequence-parallel`` (Megatron-Core refuses MoE with TP but
without it in training).
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron_eaft.megatron.bridge import add_sft_run_args, apply_sft_run_args, finetune_with_eaft


def autobridge_sft_config(args: argparse.Namespace) -> Any:
    """Bridge's SFT recipe base with AutoBridge's provider for ``args.hf``, starting from
    ``args.megatron_checkpoint``."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _sft_common

    cfg = _sft_common()
    cfg.model = AutoBridge.from_hf_pretrained(args.hf).to_megatron_provider(load_weights=False)
    cfg.model.tensor_model_parallel_size = args.tp
    cfg.model.pipeline_model_parallel_size = args.pp
    cfg.model.expert_model_parallel_size = args.ep
    cfg.model.sequence_parallel = args.sequence_parallel
    cfg.model.seq_length = args.seq_length
    cfg.tokenizer.tokenizer_model = args.hf
    apply_sft_run_args(cfg, args)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf", required=True, help="HF model directory or hub id (config, tokenizer)"
    )
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
    parser.add_argument(
        "--sequence-parallel", action="store_true", help="sequence parallelism (MoE at TP > 1)"
    )
    return add_sft_run_args(parser, default_tp=1).parse_args(argv)


def main() -> None:
    args = parse_args()
    finetune_with_eaft(autobridge_sft_config(args), args)


if __name__ == "__main__":
    main()
