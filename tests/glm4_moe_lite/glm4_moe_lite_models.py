"""Tiny random GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`) checkpoints built with transformers.

Three layers: one dense, then two MoE layers of 4 routed experts (top 2) and a shared expert;
MLA with q / kv low-rank projections, query/key head 8 + 8 (nope + rope), value head 12;
rms_norm_eps 1e-5, so the latent norms' fixed 1e-6 shows if it is lost; a vocab that pads
(200 -> 256). Every tensor is random, the latent norms, the router and the expert bias
(a buffer) included, with a bias large enough to change which experts are chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 200
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "num_nextn_predict_layers": 1,
}
# Small q / kv latents (mean square ~6e-3), so that the latent norms' eps (1e-6 in transformers,
# whatever rms_norm_eps says) moves the logits by more than the test's tolerance if it is lost.
LATENT_DOWN_PROJECTIONS = ("q_a_proj.weight", "kv_a_proj_with_mqa.weight")
LATENT_SCALE = 0.1


def config(**changes: Any):
    import transformers

    return transformers.Glm4MoeLiteConfig(
        **{**CONFIG, **changes}, architectures=["Glm4MoeLiteForCausalLM"]
    )


def random_model(hf_config, seed: int = 0):
    """The transformers model with every tensor random (norm weights around 1)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Glm4MoeLiteForCausalLM(hf_config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
            if name.endswith(LATENT_DOWN_PROJECTIONS):
                param.mul_(LATENT_SCALE)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
    return model


# A one-layer model whose layer is the MTP layer (an MoE layer).
MTP_LAYER = {
    "num_hidden_layers": 1,
    "mlp_layer_types": ["sparse"],
    "first_k_dense_replace": 0,
    "num_nextn_predict_layers": 0,
}


def mtp_head(hf_config, seed: int = 0):
    """A random MTP layer for ``hf_config`` as transformers modules (tests/mtp/reference.py):
    a one-layer model whose layer is an MoE layer, as the MTP layer is."""
    import transformers
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteRMSNorm

    from tests.mtp.reference import build_head

    layer_config = config(**MTP_LAYER)
    model_class = transformers.Glm4MoeLiteForCausalLM
    hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
    return build_head(model_class, layer_config, Glm4MoeLiteRMSNorm, hidden, eps, seed)


def save(model, directory: Path, seed: int = 0, copies: bool = True) -> Path:
    """save_pretrained, plus an MTP layer (which transformers does not build) under the
    published names ``model.layers.{num_hidden_layers}.*``; ``copies``: with the copies of
    the embedding and output layer DeepSeek-style checkpoints keep there."""
    from tests.mtp.reference import add_tensors, layer_tensors

    model.save_pretrained(directory)
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    head = mtp_head(model.config, seed)
    tensors = layer_tensors(head, directory.parent / f"{directory.name}-mtp-layer", prefix)
    tensors.update(
        {
            prefix + "eh_proj.weight": head.eh_proj.weight,
            prefix + "enorm.weight": head.enorm.weight,
            prefix + "hnorm.weight": head.hnorm.weight,
            prefix + "shared_head.norm.weight": head.layer_model.model.norm.weight,
        }
    )
    if copies:
        tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight
        tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight
    dtype = model.model.embed_tokens.weight.dtype
    add_tensors(
        directory,
        {
            k: v.detach()
            .to(torch.float32 if "e_score_correction_bias" in k else dtype)
            .clone()
            .contiguous()
            for k, v in tensors.items()
        },
    )
    return directory


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def mtp_head_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """The reference MTP forward (tests/mtp/reference.py) of a checkpoint with one MTP layer
    under the published names (what ``save`` writes, or an export), fp32 logits."""
    import transformers
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteRMSNorm

    from tests.mtp.reference import head_from_checkpoint

    hf_config = transformers.AutoConfig.from_pretrained(directory)
    prefix = f"model.layers.{hf_config.num_hidden_layers}."
    names = {
        "eh_proj": prefix + "eh_proj.weight",
        "enorm": prefix + "enorm.weight",
        "hnorm": prefix + "hnorm.weight",
        "norm": prefix + "shared_head.norm.weight",
    }
    copies = (prefix + "embed_tokens.weight", prefix + "shared_head.head.weight")
    layer_config = type(hf_config)(**{**hf_config.to_dict(), **MTP_LAYER})
    main_model, head = head_from_checkpoint(
        directory, layer_config, Glm4MoeLiteRMSNorm, prefix, names, copies
    )
    return head.logits(main_model, input_ids)
