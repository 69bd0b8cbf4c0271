"""The demo's base model: a tiny Qwen3 (transformers) pre-trained in plain torch on general text.

Short pre-training on the general corpus until the model is confident about its facts; then
it is saved as an ordinary HF checkpoint (safetensors + config + tokenizer), the kind of
directory `megatron-eaft convert import` takes from the Hub.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    # Qwen3 ships 1e6 for long contexts; a 128-token toy learns faster with the classic base.
    rope_theta: float = 10_000.0


# The smallest shape worth running: what the quick settings (the tests) pre-train.
TINY_SHAPE = ModelShape(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
)


@dataclass(frozen=True)
class PretrainSettings:
    # Measured: copying the question's entity into the answer (and so 99/99 general questions
    # right) appears between 300 and 800 steps of batches of 8 x 128 tokens.
    steps: int = 800
    batch_size: int = 8
    seq_length: int = 128
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0


def qwen3_config(shape: ModelShape, tokenizer: Any):
    """A Qwen3 config (GQA, per-head q/k RMSNorm, SwiGLU, RoPE, untied) for ``tokenizer``."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_stream(documents: list[str], tokenizer: Any) -> torch.Tensor:
    """All documents' ids, each followed by the end-of-text (pad) token, as one int64 tensor."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.pad_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def _learning_rate(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    documents: list[str],
    tokenizer: Any,
    shape: ModelShape,
    settings: PretrainSettings,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train from scratch on random windows of the token stream; save to ``out_dir``.

    Returns the loss curve (per step) and the parameter count.
    """
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(qwen3_config(shape, tokenizer))
    model.train()
    stream = token_stream(documents, tokenizer)
    if stream.numel() <= settings.seq_length + 1:
        raise ValueError(
            f"the corpus has {stream.numel()} tokens, fewer than one window of "
            f"{settings.seq_length + 1}"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        starts = torch.randint(
            0, stream.numel() - settings.seq_length - 1, (settings.batch_size,), generator=generator
        )
        windows = torch.stack([stream[s : s + settings.seq_length + 1] for s in starts.tolist()])
        out = model(input_ids=windows[:, :-1], labels=windows[:, :-1].clone())
        # transformers shifts the labels itself: position t predicts input t + 1.
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        if (step + 1) % max(1, settings.steps // 6) == 0 or step + 1 == settings.steps:
            log(
                f"  pre-train step {step + 1:4d}/{settings.steps}: loss {losses[-1]:.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": int(stream.numel()),
    }
