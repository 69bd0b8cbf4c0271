"""A tiny Qwen3-style GPTModel and one real Megatron training step, for runtime tests."""

from __future__ import annotations

import zlib
from functools import partial

import torch

VOCAB = 256
SEQ = 32
MICRO_BATCH = 2


def tiny_config():
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )


def tiny_model(config):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=True),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def load_layout_independent_weights(model) -> None:
    """Give every parameter the same values whatever the TP/PP layout (seeded by its name)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    layers_per_stage = (
        model.config.num_layers // parallel_state.get_pipeline_model_parallel_world_size()
    )
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts:  # local layer index -> global, so PP stages agree with PP=1
            index = parts.index("layers") + 1
            parts[index] = str(int(parts[index]) + pp_rank * layers_per_stage)
        generator = torch.Generator().manual_seed(zlib.crc32(".".join(parts).encode()))
        partition_dim = getattr(param, "partition_dim", -1)
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False) and partition_dim >= 0:
            full_shape[partition_dim] *= tp
        full = torch.randn(full_shape, generator=generator) * 0.05
        if "layernorm" in name or "norm" in parts[-2]:
            full = 1.0 + full
        if getattr(param, "tensor_model_parallel", False) and partition_dim >= 0:
            full = _tp_shard(full, name, tp, tp_rank, partition_dim)
        with torch.no_grad():
            param.copy_(full)


def _tp_shard(full: torch.Tensor, name: str, tp: int, rank: int, dim: int) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):  # gated MLP: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator),
        "labels": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator),
        "loss_mask": (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.2).float(),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1),
    }


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    loss_sum = (output.float().view(-1) * loss_mask.view(-1)).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    data = next(data_iterator)
    output = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
    return output, partial(_loss_func, data["loss_mask"])


def one_training_step(
    distributed_optimizer: bool,
    num_microbatches: int = 2,
    forward_step=_forward_step,
    report_key: str = "lm loss",
    data_parallel_rank: int = 0,
) -> dict[str, float]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = tiny_config()
    model = tiny_model(config)
    load_layout_independent_weights(model)
    ddp_model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True
        ),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            use_distributed_optimizer=distributed_optimizer,
            clip_grad=1.0,
        ),
        [ddp_model],
    )
    # What Megatron-LM's setup wires in: DP/PP grad reduction after the last micro-batch.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    # Each data-parallel rank takes its own micro-batches of the same global batch.
    first = data_parallel_rank * num_microbatches
    batches = iter([batch(seed) for seed in range(first, first + num_microbatches)])
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp_model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    loss_sum, tokens = float("nan"), 0.0
    if reports:  # only the last pipeline stage computes the loss
        totals = sum(report[report_key] for report in reports)
        loss_sum, tokens = float(totals[0]), float(totals[1])
    return {
        "loss": loss_sum / tokens if tokens else float("nan"),
        "loss_sum": loss_sum,
        "tokens": tokens,
        "grad_norm": float(grad_norm),
        "update_successful": bool(update_successful),
    }
