"""Model families: one declarative file per HF architecture, found by `family_for_hf_config`.

Format of a family file
=======================

A family is a module in this package that defines ``FAMILY = ModelFamily(...)`` (types in
:mod:`megatron_eaft.models.family`). Modules are discovered automatically: adding
``families/<name>.py`` is all it takes; nothing here needs editing. A family file holds no
loops and no I/O, only:

1. ``name`` and ``architectures``: the short name stored in converted checkpoints and the HF
   ``config.json`` ``architectures`` entries it handles (each entry must belong to one family).

2. ``config``: ``(hf: HFConfig) -> dict`` of ``TransformerConfig`` keyword arguments. Read the
   HF config through ``HFConfig`` (``hf.integer(key)``, ``hf.require(key)``,
   ``hf.rope_theta(default)``) and refuse what cannot be expressed with
   ``hf.require_plain_rope()``, ``hf.require_full_attention()`` or
   ``raise hf.unsupported(key, value, why)``: the error names the config key. Parallel sizes and
   dtypes are not the family's business; ``ModelFamily.transformer_config`` adds them.

3. ``params``: a tuple of ``Param`` rows, one per Megatron checkpoint tensor::

       Param(megatron_key, hf_names, shapes, transform=COPY, when=always)

   * ``megatron_key``: the key ``GPTModel.sharded_state_dict()`` gives the tensor. Layers of
     a homogeneous decoder share one key without a layer index (``decoder.layers.mlp.
     linear_fc2.weight``), stacked on a leading layer axis; experts add an expert axis after
     it (``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is [layers, experts, ...]).
     Megatron's local spec stores ``input_layernorm`` / ``pre_mlp_layernorm`` under the
     Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``,
     ``mlp.linear_fc1.layer_norm_weight``), so one key usually serves both specs; where
     they differ give ``{"local": key, "transformer_engine": key}``.
   * ``hf_names``: one HF tensor name or a tuple of them, with ``{layer}`` (0-based) and
     ``{expert}`` placeholders. Rows with ``{layer}`` must have a ``decoder.layers.`` key.
   * ``shapes``: the HF shape of each name in ``Dims`` terms (``("hidden",)``,
     ``("q_dim", "hidden")``, products like ``"2*ffn"``); a tuple of shapes for several names.
     Every tensor is checked against them before any data is read.
   * ``transform``: ``COPY`` (one HF tensor as is), ``CONCAT_ROWS`` (fc1 = [gate; up] along
     dim 0; a fused HF ``gate_up_proj`` in that order is a ``COPY``), ``INTERLEAVE_QKV`` (q, k,
     v -> Megatron's per-query-group layout; weights and biases), ``PAD_VOCAB`` (embedding
     and output layer rows zero-padded to the padded vocab, cut back on export). New
     transforms subclass ``Transform`` in ``family.py`` with an exact inverse.
   * ``when``: ``(hf: HFConfig) -> bool``; e.g. ``untied_embeddings`` for ``output_layer``.
   * ``layers``: ``(hf, layer) -> bool``: which layers have the row, for decoders whose layers
     differ (Gated DeltaNet rows only on ``linear_attention`` layers). Megatron-Core then
     writes one key per layer (``decoder.layers.{i}.``, no stacked axis) whenever the config
     says layers differ (``linear_attention_freq`` / ``moe_layer_freq`` as a list or above 1),
     and the engine does the same (``indexed_layer_keys``).
   * More transforms: ``SplitRows(*sections)`` (one HF tensor -> several Megatron keys by row
     sections; the row's ``megatron`` is then a tuple of keys), ``INTERLEAVE_GATED_QKV``
     (gated attention: HF ``q_proj`` per head [q; gate] -> [queries; gates; k; v] per group),
     ``ZERO_CENTERED_NORM`` (a plain HF norm weight ``w`` stored as Megatron's ``w - 1``),
     ``PackedExperts(inner)`` / ``PACKED_EXPERTS`` (HF tensors with every expert of a layer on
     a leading axis, ``experts.gate_up_proj`` [E, 2*moe_ffn, hidden]: one unit per layer, HF
     names with ``{layer}`` and no ``{expert}``; same Megatron keys as the per-expert rows).
   * ``variant``: ``(group, option)`` for rows that are one of several HF layouts of the same
     Megatron tensors. Import reads the option the checkpoint has, records it in the metadata
     (``hf_variants``) and export writes it back; a group's first option is its default.
     ``routed_expert_rows(hf_prefix, layers=..., default=PACKED)`` gives the routed experts'
     fc1 / fc2 rows in both layouts (``("experts", "packed")`` / ``("experts", "per_expert")``).
   * ``dtype``: a dtype the tensor keeps whatever the checkpoint's (``--dtype`` included), where
     both sides keep it so (the fp32 MoE expert bias beside bf16 weights).

4. Optional: ``dims`` (HF config -> ``Dims``; default reads the Llama/Qwen key names),
   ``gpt_model_kwargs`` (HF config -> GPTModel arguments: rotary base/percent, tied
   embeddings; default ``rope_gpt_model_kwargs``), ``layer_spec_fn`` ((TransformerConfig,
   transformer_impl) -> ModuleSpec; default Megatron-Core's local / Transformer Engine GPT
   spec; a family with its own layer module supplies one that builds both), ``block_spec_fn``
   ((TransformerConfig, transformer_impl, vp_stage) -> decoder block spec, for hybrid decoders),
   ``ignored_hf`` (HF names that may be present but are not converted, e.g. ``lm_head.weight``
   next to tied embeddings), ``hf_config_class`` (transformers' config class: keys a
   config.json omits are read as transformers reads them), ``layouts`` (per architecture, an
   ``HFLayout``: the language model's sub-config and tensor prefix in vision-language
   checkpoints, and the tensors carried through unconverted) and ``megatron_config_class``
   (``TransformerConfig`` or e.g. ``MLATransformerConfig``) and ``carried_hf`` (HF config ->
   prefixes of further tensors carried byte-identical, e.g. MTP layers numbered after the
   decoder's: ``model.layers.{num_hidden_layers}.``).

The engine derives everything else: which HF tensors must exist (missing / unexpected /
mis-shaped ones are reported together), global shapes and chunks per layer and expert, the
``_extra_state`` entries Megatron's linear layers expect (one per ``linear_*`` module), vocab
padding and the inverse for export. ``tests/convert/test_families.py`` checks each family's
keys and global shapes against a real ``GPTModel.sharded_state_dict()``; a new family gets the
same check by adding its tiny config there.

Example (trimmed from qwen2.py)::

    L = "model.layers.{layer}."
    FAMILY = ModelFamily(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        config=qwen2_config,
        params=(
            Param("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                  ("vocab", "hidden"), PAD_VOCAB),
            Param("decoder.layers.self_attention.linear_qkv.weight",
                  (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
                   L + "self_attn.v_proj.weight"),
                  (("q_dim", "hidden"), ("kv_dim", "hidden"), ("kv_dim", "hidden")),
                  INTERLEAVE_QKV),
            Param("decoder.layers.mlp.linear_fc1.weight",
                  (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
                  (("ffn", "hidden"), ("ffn", "hidden")), CONCAT_ROWS),
            ...
        ),
    )
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import cache
from typing import Any

from megatron_eaft.models.family import ModelFamily, UnsupportedConfigError


@cache
def all_families() -> dict[str, ModelFamily]:
    """Every family module in this package, by family name."""
    families: dict[str, ModelFamily] = {}
    owners: dict[str, str] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, ModelFamily):
            raise TypeError(f"{module.__name__} must define FAMILY = ModelFamily(...)")
        if family.name in families:
            raise ValueError(f"two family modules are named {family.name!r}")
        for architecture in family.architectures:
            if architecture in owners:
                raise ValueError(
                    f"architecture {architecture!r} is claimed by both {owners[architecture]!r} "
                    f"and {family.name!r}"
                )
            owners[architecture] = family.name
        families[family.name] = family
    return families


def get_family(name: str) -> ModelFamily:
    families = all_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(families)}")
    return families[name]


def family_for_hf_config(hf_config: Mapping[str, Any]) -> ModelFamily:
    """The family converting this HF config; ValueError names an unknown architecture.

    The config is also validated (unsupported options raise ``UnsupportedConfigError``, a
    ValueError naming the option), so a caller learns about a config it cannot use before
    any tensor is touched.
    """
    architectures = hf_config.get("architectures")
    if not architectures or not isinstance(architectures, list | tuple):
        raise ValueError(
            "config.json has no 'architectures' list; cannot tell which model family it is"
        )
    if len(architectures) != 1:
        raise ValueError(f"config.json lists several architectures {architectures}; expected one")
    (architecture,) = architectures
    for family in all_families().values():
        if architecture in family.architectures:
            family.transformer_config_kwargs(hf_config)
            return family
    known = sorted(a for f in all_families().values() for a in f.architectures)
    raise ValueError(f"unsupported architecture {architecture!r}; supported: {known}")


__all__ = [
    "ModelFamily",
    "UnsupportedConfigError",
    "all_families",
    "family_for_hf_config",
    "get_family",
]
