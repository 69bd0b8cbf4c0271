"""Tiny random Qwen2 / Qwen3 / Qwen3-MoE checkpoints built with transformers (no downloads).

Every case pads its vocab (200 -> 256 rows) and has GQA; Qwen3 cases use a head_dim that
is not hidden / heads. All weights are random, norms and biases included, so a misplaced
norm or a wrong QKV layout changes the logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 200  # pads to 256 with Megatron's default divisor of 128
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
}
# Stand-ins for the tokenizer files an HF directory carries: the converter only copies them.
SIDE_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 64}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
}


@dataclass(frozen=True)
class Case:
    architecture: str
    overrides: dict[str, Any]
    expert_parallel: bool = False


CASES: dict[str, Case] = {
    "qwen2_tied": Case("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_untied": Case("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3_untied": Case("Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 24}),
    "qwen3_tied": Case("Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 24}),
    "qwen3_moe": Case(
        "Qwen3MoeForCausalLM",
        {
            "tie_word_embeddings": False,
            "head_dim": 24,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
        expert_parallel=True,
    ),
    "qwen3_moe_tied_unnormalized": Case(
        "Qwen3MoeForCausalLM",
        {
            "tie_word_embeddings": True,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
        },
        expert_parallel=True,
    ),
}


def hf_config(case: str | Case):
    import transformers

    case = CASES[case] if isinstance(case, str) else case
    config_class = getattr(transformers, case.architecture.replace("ForCausalLM", "Config"))
    return config_class(**{**COMMON, **case.overrides}, architectures=[case.architecture])


def random_model(config, seed: int = 0):
    """The transformers model with every tensor random (norms near 1, the rest small)."""
    import transformers

    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


def save_hf(model, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    for name, text in SIDE_FILES.items():
        (directory / name).write_text(text)
    return directory


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
