"""Tiny random Qwen3.5-MoE checkpoints built with transformers (no downloads).

The Qwen3.5 test decoder (``tests/qwen3_5/qwen3_5_models.py``: [linear, full, linear, full]
attention, GQA in both kinds, partial RoPE, a vocab that pads) with an MoE in every layer:
4 experts, top 2, a shared expert of another width than the routed ones, every tensor random
(router and shared-expert gate included). ``save`` writes what transformers'
``save_pretrained`` writes (per-expert tensors); ``save_packed`` writes the same weights with
the experts packed, as the published Qwen3.5 / Qwen3.6 MoE checkpoints store them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.qwen3_5 import qwen3_5_models as q35

VOCAB = q35.VOCAB
MOE: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "router_aux_loss_coef": 0.001,
}
TEXT: dict[str, Any] = {
    **{k: v for k, v in q35.TEXT.items() if k != "intermediate_size"},
    **MOE,
}


def text_config(**changes: Any):
    import transformers

    return transformers.Qwen3_5MoeTextConfig(
        **{**TEXT, **changes}, architectures=["Qwen3_5MoeForCausalLM"]
    )


def vl_config(**text_changes: Any):
    import transformers

    return transformers.Qwen3_5MoeConfig(
        text_config={**TEXT, **text_changes},
        vision_config=q35.VISION,
        tie_word_embeddings=TEXT["tie_word_embeddings"],
        architectures=["Qwen3_5MoeForConditionalGeneration"],
    )


random_model = q35.random_model
save = q35.save
logits = q35.logits


def save_packed(model, directory: Path) -> Path:
    """The model's own tensors (experts packed [E, ...]) as one safetensors file + config."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    return directory
