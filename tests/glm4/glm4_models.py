"""A tiny random transformers GLM-4 and the same weights in a Megatron GPTModel at any TP/PP.

The HF -> Megatron weight placement here is written independently of the conversion engine
(straight from modeling_glm4.py and the Megatron parameter layout), so the layer tests do
not depend on the engine and the engine tests have a second opinion to agree with.

Functions whose names start with ``rank_`` run inside a `dist` worker (one per rank).
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 160  # divisible by 2: the layer tests do not exercise vocab padding (the engine's job)
SEQ = 12
BATCH = 2


def tiny_hf_config(tie_word_embeddings: bool = False, vocab_size: int = VOCAB, **overrides: Any):
    """GLM-4 shapes in miniature: GQA, head_dim != hidden / heads, qkv bias, partial RoPE."""
    from transformers import Glm4Config

    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "attention_bias": True,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    fields.update(overrides)
    return Glm4Config(**fields)


def random_hf_model(config, seed: int = 0):
    """Glm4ForCausalLM in fp32 with every tensor random, norms and biases included."""
    from transformers import Glm4ForCausalLM

    torch.manual_seed(seed)
    model = Glm4ForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            # Norm weights near 1, like a trained model; everything else small.
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.08 * noise)
    return model


def sample_tokens(vocab_size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors as saved to safetensors (a tied lm_head is not a separate tensor)."""
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ----------------------------------------------------------------------------------------
# Megatron side (inside a worker, after cpu_runtime.initialize_parallel)


def megatron_config(hf_config):
    """TransformerConfig for a GLM-4 HF config, read independently of the family table."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.attention_bias,
        rotary_interleaved=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )


def build_megatron_glm4(hf_config, vocab_size: int | None = None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_eaft.models.glm4_layer import glm4_layer_spec

    return GPTModel(
        megatron_config(hf_config),
        glm4_layer_spec("local"),
        vocab_size=vocab_size or hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=hf_config.rope_parameters["partial_rotary_factor"],
        rotary_base=hf_config.rope_parameters["rope_theta"],
        share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).eval()


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] rows regrouped per query group: [q_g, k_g, v_g] for g in groups."""
    per_group = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def full_megatron_tensor(name: str, hf: dict[str, torch.Tensor], hf_config, layer: int):
    """The full (unsharded) tensor for Megatron parameter `name` of global layer `layer`."""
    prefix = f"model.layers.{layer}."
    leaf = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    if leaf in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = leaf.rsplit(".", 1)[1]
        q, k, v = (hf[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv")
        return _interleave_qkv(q, k, v, hf_config.num_key_value_heads)
    by_leaf = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "post_self_attn_layernorm.weight": "post_self_attn_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc1.weight": "mlp.gate_up_proj.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
        "post_mlp_layernorm.weight": "post_mlp_layernorm.weight",
    }
    if name.startswith("decoder.layers."):
        return hf[prefix + by_leaf[leaf]]
    embedding = hf["model.embed_tokens.weight"]
    top_level = {
        "embedding.word_embeddings.weight": embedding,
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf.get("lm_head.weight", embedding),
    }
    return top_level[name]


def load_hf_weights(model, hf: dict[str, torch.Tensor], hf_config) -> None:
    """Copy HF tensors into this rank's shards, whatever the TP/PP layout."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * (
        hf_config.num_hidden_layers // parallel_state.get_pipeline_model_parallel_world_size()
    )
    for name, param in model.named_parameters():
        layer = int(name.split(".")[2]) + layer_offset if name.startswith("decoder.layers.") else -1
        full = full_megatron_tensor(name, hf, hf_config, layer)
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            if name.endswith("mlp.linear_fc1.weight"):  # each rank holds [gate_r; up_r]
                gate, up = full.chunk(2, dim=0)
                full_shard = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
            else:
                full_shard = full.chunk(tp, dim=dim)[tp_rank]
        else:
            full_shard = full
        if full_shard.shape != param.shape:
            raise AssertionError(
                f"{name}: HF gives {tuple(full_shard.shape)}, param is {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(full_shard)


def _gathered_logits(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output).detach().clone()


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None), _gathered_logits


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last pipeline stage, None on the others."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def rank_logits_from_hf(
    hf: dict[str, torch.Tensor], hf_config, tokens: torch.Tensor, tp: int, pp: int
):
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    model = build_megatron_glm4(hf_config)
    load_hf_weights(model, hf, hf_config)
    return forward_logits(model, tokens)


def last_stage_logits(results: list[Any]) -> torch.Tensor:
    logits = [r for r in results if r is not None]
    if not logits:
        raise AssertionError("no rank returned logits")
    for other in logits[1:]:  # every TP rank of the last stage gathers the full vocab
        torch.testing.assert_close(other, logits[0], rtol=0, atol=0)
    return logits[0]
