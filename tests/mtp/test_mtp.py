"""Multi-token prediction (MTP) converted both ways, for Qwen3.5 (dense and MoE) and GLM-4.7-Flash.

Megatron's MTP logits of the converted checkpoint against a reference MTP forward built from
transformers' own modules loaded with the HF MTP weights (tests/mtp/reference.py), fp32 within
1e-4, the main logits unchanged; HF -> Megatron -> HF bit-exact with the MTP tensors converted
(GLM's copies of the embedding and output layer carried). One pool job, one rank.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import (
    export_megatron_checkpoint,
    import_hf_checkpoint,
    plan_conversion,
)
from megatron_eaft.models.families import family_for_hf_config
from tests.glm4_moe_lite import glm4_moe_lite_models as glm
from tests.qwen3_5 import qwen3_5_models as q35
from tests.qwen3_5_moe import qwen3_5_moe_models as q35moe

ATOL = 1e-4
SEQ_LEN = 10


def _qwen(config, directory: Path, input_ids: torch.Tensor) -> SimpleNamespace:
    model = q35.random_model(config, seed=3)
    head = q35.mtp_head(config, seed=4)
    hf_dir = q35.save_with_mtp(model, head, directory / "hf")
    return _imported(hf_dir, model, head, input_ids)


def _glm(directory: Path, input_ids: torch.Tensor) -> SimpleNamespace:
    model = glm.random_model(glm.config(), seed=3)
    hf_dir = glm.save(model, directory / "hf", seed=4)
    return _imported(hf_dir, model, glm.mtp_head(model.config, seed=4), input_ids)


def _imported(hf_dir: Path, model, head, input_ids: torch.Tensor) -> SimpleNamespace:
    megatron_dir = hf_dir.parent / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
    return SimpleNamespace(
        hf_dir=hf_dir,
        megatron_dir=megatron_dir,
        logits=q35.logits(model, input_ids),
        mtp_logits=head.logits(model, input_ids),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    input_ids = verify.sample_inputs(q35.VOCAB, batch=2, seq_len=SEQ_LEN, seed=5)
    made = {
        "qwen3_5": _qwen(q35.text_config(mtp_num_hidden_layers=1), root / "qwen3_5", input_ids),
        "qwen3_5_moe": _qwen(
            q35moe.text_config(mtp_num_hidden_layers=1), root / "qwen3_5_moe", input_ids
        ),
        "glm4_moe_lite": _glm(root / "glm4_moe_lite", input_ids),
    }
    return input_ids, made


def megatron_mtp_logits(megatron_dir: str, input_ids: torch.Tensor):
    """Rank function (one rank): fp32 main and MTP-head logits, [batch, seq, vocab] each."""
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata

    cpu_runtime.initialize_parallel()
    metadata = read_model_metadata(megatron_dir)
    model = build_model(metadata, ParallelLayout(), dtype=torch.float32, transformer_impl="local")
    load_model_weights(model, megatron_dir)
    model.eval()
    captured = {}
    hook = model.mtp.register_forward_hook(lambda m, a, out: captured.setdefault("mtp", out))
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        main = model(input_ids, position_ids, None)
        # The block returns [main; MTP layer 1; ...] hidden states along the sequence axis.
        _, mtp_hidden = torch.chunk(captured["mtp"], 2, dim=0)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        mtp, _ = model.output_layer(mtp_hidden, weight=weight)
    hook.remove()
    vocab = metadata.vocab_size
    return main[..., :vocab].float(), mtp.transpose(0, 1)[..., :vocab].float()


def _all_mtp_logits(megatron_dirs: list[str], input_ids: torch.Tensor):
    return [megatron_mtp_logits(d, input_ids) for d in megatron_dirs]


def test_mtp_logits_match_the_reference_forward(dist, checkpoints):
    input_ids, made = checkpoints
    names = sorted(made)
    dirs = [str(made[n].megatron_dir) for n in names]
    results = dist.run(_all_mtp_logits, 1, dirs, input_ids)[0]
    for name, (main, mtp) in zip(names, results, strict=True):
        # The last position's next token is past the sequence: no label, not compared.
        reference = made[name].mtp_logits[:, :-1]
        comparison = verify.compare_logits(reference, mtp[:, :-1])
        assert comparison.max_abs_diff <= ATOL, (name, comparison.line())
        assert comparison.top1_agreement == 1.0, (name, comparison.line())
        main_comparison = verify.compare_logits(made[name].logits, main)
        assert main_comparison.max_abs_diff <= ATOL, (name, main_comparison.line())
        # The MTP head predicts something else than the main head.
        assert (reference - made[name].logits[:, :-1]).abs().max() > 100 * ATOL, name
