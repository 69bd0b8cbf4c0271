"""Dense GLM-4 (GLM-4-0414) full SFT in Megatron-Bridge with EAFT, from our conversion.

Megatron-Bridge has no dense GLM-4 (``Glm4ForCausalLM``) bridge: its layers have two extra
"sandwich" norms. ``megatron-eaft convert import`` converts it, and this script hands Bridge a
model provider built from that checkpoint's metadata with our GLM-4 layer spec
(``megatron_eaft.models.glm4_layer``), so Bridge's trainer, data and checkpointing run it:

    megatron-eaft convert import --hf /models/GLM-4-9B-0414 --out /ckpt/glm4-9b \
        --transformer-impl transformer_engine --dtype bf16
    torchrun --nproc-per-node 8 examples/bridge/glm4_eaft_sft.py \
        --megatron-checkpoint /ckpt/glm4-9b --save /ckpt/glm4-9b-eaft --tp 4 \
        --dataset-root /data/glm4_sft --eaft-kind eaft

``checkpoint.pretrained_checkpoint`` points at the converted torch_dist directory (its tracker
says ``release``); the tokenizer is the HF one the conversion copied to ``<checkpoint>/hf``.
The training set-up (optimizer, schedule, packed-sequence SFT data) is Bridge's SFT recipe base.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_eaft.megatron.bridge import (
    add_sft_run_args,
    apply_sft_run_args,
    finetune_with_eaft,
    glm4_layer_spec,
)
from megatron_eaft.models import ModelMetadata
from megatron_eaft.models.checkpoint_dir import HF_FILES_DIR


def glm4_model_provider(
    checkpoint: Path, tp: int, pp: int, seq_length: int, dtype: torch.dtype = torch.bfloat16
) -> Any:
    """A Bridge GPTModelProvider for the converted GLM-4 checkpoint, with our layer spec."""
    from megatron.bridge.models import GPTModelProvider

    metadata = ModelMetadata.read(checkpoint)
    hf_config = metadata.hf_config
    family = metadata.model_family
    if family.name != "glm4":
        raise SystemExit(f"{checkpoint} holds a {family.name} model, not GLM-4")
    transformer_impl = metadata.transformer_impl
    model_kwargs = family.gpt_model_kwargs(family.hf(hf_config))
    model_kwargs.pop("max_sequence_length", None)  # Bridge's provider calls it seq_length

    return GPTModelProvider(
        **family.transformer_config_kwargs(hf_config),
        **model_kwargs,
        transformer_layer_spec=glm4_layer_spec,
        vocab_size=metadata.padded_vocab_size,
        should_pad_vocab=False,  # the checkpoint's padded embedding rows, as converted
        seq_length=seq_length,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        transformer_impl=transformer_impl,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype if pp > 1 else None,
    )


def glm4_sft_config(args: argparse.Namespace):
    # Bridge's shared SFT recipe base (optimizer, cosine schedule, packed SFT data, logging);
    # it leaves model and tokenizer to the caller, as every Bridge SFT recipe does.
    from megatron.bridge.recipes.common import _sft_common

    checkpoint = Path(args.megatron_checkpoint)
    cfg = _sft_common()
    cfg.model = glm4_model_provider(checkpoint, args.tp, args.pp, args.seq_length)
    cfg.tokenizer.tokenizer_model = str(checkpoint / HF_FILES_DIR)
    apply_sft_run_args(cfg, args)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    return add_sft_run_args(parser, default_tp=4).parse_args(argv)


def main() -> None:
    args = parse_args()
    finetune_with_eaft(glm4_sft_config(args), args)


if __name__ == "__main__":
    main()
