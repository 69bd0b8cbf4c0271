"""Build the Megatron-Core GPTModel of an HF config, at whatever TP/PP/EP is initialised."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from megatron_eaft.convert.families import family_for_hf_config
from megatron_eaft.convert.family import DEFAULT_VOCAB_DIVISOR
from megatron_eaft.convert.family import padded_vocab_size as megatron_padded_vocab

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig


def build_gpt_model(
    hf_config: Mapping[str, Any],
    config: TransformerConfig,
    *,
    transformer_impl: str = "local",
    pre_process: bool = True,
    post_process: bool = True,
    padded_vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    vp_stage: int | None = None,
) -> GPTModel:
    """GPTModel for ``hf_config`` with ``config`` (from ``family.transformer_config``).

    The vocab is padded Megatron-LM's way (a multiple of ``make_vocab_size_divisible_by * tp``)
    unless ``padded_vocab_size`` is given; a converted checkpoint loads at any padding, since
    Megatron reads the embedding and output rows that overlap. Rotary base / percent and tied
    embeddings come from the family. Padded vocab rows produce logits the loss must ignore
    (ids >= the HF ``vocab_size`` never occur as labels).
    """
    from megatron.core.models.gpt import GPTModel

    family = family_for_hf_config(hf_config)
    hf = family.hf(hf_config)
    vocab = family.dims(hf).vocab
    if padded_vocab_size is None:
        padded = megatron_padded_vocab(
            vocab, make_vocab_size_divisible_by, config.tensor_model_parallel_size
        )
    else:
        padded = padded_vocab_size
    if padded < vocab:
        raise ValueError(f"padded_vocab_size {padded} is smaller than vocab_size {vocab}")
    if padded % config.tensor_model_parallel_size:
        raise ValueError(
            f"padded_vocab_size {padded} is not divisible by TP={config.tensor_model_parallel_size}"
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=family.layer_spec(config, transformer_impl),
        vocab_size=padded,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **family.gpt_model_kwargs(hf),
    )
