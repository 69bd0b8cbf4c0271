"""Tiny random Qwen3.5 checkpoints built with transformers (no downloads).

Four layers, [linear, full, linear, full] attention, so every pipeline stage of PP2 holds both
kinds; GQA in both attention kinds (2 query groups, 2 key heads for 4 value heads); a head_dim
that is not hidden / heads; partial RoPE over 6 of 24 dims with an M-RoPE section like the
published configs; a vocab that pads (200 -> 256). Every tensor is random, norms (zero-centred
and not), A_log and dt_bias included, so a misplaced row changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 200
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [1, 1, 1],
        "mrope_interleaved": True,
    },
}
VISION: dict[str, Any] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 16,
}


def text_config(**changes: Any):
    import transformers

    return transformers.Qwen3_5TextConfig(
        **{**TEXT, **changes}, architectures=["Qwen3_5ForCausalLM"]
    )


def vl_config(**text_changes: Any):
    import transformers

    return transformers.Qwen3_5Config(
        text_config={**TEXT, **text_changes},
        vision_config=VISION,
        tie_word_embeddings=TEXT["tie_word_embeddings"],
        architectures=["Qwen3_5ForConditionalGeneration"],
    )


def random_model(config, seed: int = 0):
    """The transformers model with every tensor random (norm weights around 1)."""
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


def save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def mtp_head(config, seed: int = 0):
    """A random MTP layer for ``config`` (``mtp_num_hidden_layers`` 1) as transformers modules
    (see tests/mtp/reference.py): a one-layer full-attention model of the same class."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    from tests.mtp.reference import build_head

    model_class = getattr(transformers, config.architectures[0])
    hidden, eps = config.hidden_size, config.rms_norm_eps
    return build_head(model_class, _mtp_layer_config(config), Qwen3_5RMSNorm, hidden, eps, seed)


def _mtp_layer_config(config):
    """The config of a one-layer model whose layer is the MTP layer (full attention)."""
    changes = {"num_hidden_layers": 1, "layer_types": ["full_attention"]}
    return type(config)(**{**config.to_dict(), **changes, "mtp_num_hidden_layers": 0})


def save_with_mtp(model, head, directory: Path) -> Path:
    """save_pretrained, plus the MTP layer's tensors under the published names (``mtp.*``)."""
    from tests.mtp.reference import add_tensors, layer_tensors

    model.save_pretrained(directory)
    tensors = layer_tensors(head, directory.parent / f"{directory.name}-mtp-layer", "mtp.layers.0.")
    tensors.update(
        {
            "mtp.fc.weight": head.eh_proj.weight,
            "mtp.pre_fc_norm_embedding.weight": head.enorm.weight,
            "mtp.pre_fc_norm_hidden.weight": head.hnorm.weight,
            "mtp.norm.weight": head.layer_model.model.norm.weight,
        }
    )
    add_tensors(directory, {k: v.detach().clone().contiguous() for k, v in tensors.items()})
    return directory


def mtp_head_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """The reference MTP forward (tests/mtp/reference.py) of a checkpoint with one MTP layer
    under the published names (what ``save_with_mtp`` writes, or an export), fp32 logits."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    from tests.mtp.reference import head_from_checkpoint

    config = transformers.AutoConfig.from_pretrained(directory)
    names = {
        "eh_proj": "mtp.fc.weight",
        "enorm": "mtp.pre_fc_norm_embedding.weight",
        "hnorm": "mtp.pre_fc_norm_hidden.weight",
        "norm": "mtp.norm.weight",
    }
    main_model, head = head_from_checkpoint(
        directory, _mtp_layer_config(config), Qwen3_5RMSNorm, "mtp.layers.0.", names
    )
    return head.logits(main_model, input_ids)
