"""EAFT inside GPTModel and Megatron's schedules: equal to the oracle, layout-independent,
bit-identical to Megatron when the kind is sft, packed rows equal separate documents."""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.ops import EAFTConfig, reference_token_loss
from tests.megatron import tiny_gpt

EAFT = EAFTConfig(kind="eaft", topk=8, check_finite=True)


def _built_model(cross_entropy_loss_fusion: bool = False):
    from megatron.core import parallel_state

    config = tiny_gpt.tiny_config()
    config.cross_entropy_loss_fusion = cross_entropy_loss_fusion
    model = tiny_gpt.tiny_model(config)
    tiny_gpt.load_layout_independent_weights(model)
    del parallel_state
    return model


def _losses_by_seam(
    tp: int, eaft_config: EAFTConfig, fusion: bool = False
) -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import install_eaft_loss

    cpu_runtime.initialize_parallel(tp=tp)
    model = _built_model(cross_entropy_loss_fusion=fusion)
    data = tiny_gpt.batch(0)
    args = (data["tokens"], data["position_ids"], None)
    with torch.no_grad():
        megatron_loss = model(*args, labels=data["labels"])
        logits = model(*args)  # [b, s, V/TP]
        full_logits = gather_from_tensor_model_parallel_region(logits)
        handle = install_eaft_loss(model, eaft_config)
        installed = model(*args, labels=data["labels"])
        stats = getattr(installed, "eaft_stats", None)
        handle.remove()
        removed = model(*args, labels=data["labels"])
    return {
        "megatron": megatron_loss,
        "installed": installed,
        "weight": None if stats is None else stats.weight,
        "removed": removed,
        "logits": full_logits,
        "labels": data["labels"],
    }


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("diagnostics", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_sft_is_bit_identical_to_megatron(dist, tp, diagnostics, fusion):
    """With and without Megatron's cross_entropy_loss_fusion."""
    config = EAFTConfig(kind="sft", diagnostics=diagnostics)
    for result in dist.run(_losses_by_seam, tp, tp, config, fusion):
        assert torch.equal(result["installed"], result["megatron"])
        assert torch.equal(result["removed"], result["megatron"])


def test_eaft_in_the_model_equals_the_oracle_on_full_logits(dist):
    results = dist.run(_losses_by_seam, 2, 2, EAFT)
    first = results[0]
    expected = reference_token_loss(first["logits"], first["labels"], EAFT)
    torch.testing.assert_close(first["installed"], expected.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1]["weight"], first["weight"])
    assert torch.equal(first["removed"], first["megatron"]), "remove() restores Megatron's loss"
    assert not torch.allclose(first["installed"], first["megatron"])


def _eaft_train_step(tp: int, pp: int, dp: int, config: EAFTConfig, microbatches: int):
    from megatron.core import parallel_state

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import EAFTForwardStep

    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    return tiny_gpt.one_training_step(
        distributed_optimizer=dp > 1,
        num_microbatches=microbatches // dp,
        forward_step=EAFTForwardStep(config),
        report_key="eaft loss",
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
    )


def _global_loss(results: list[dict]) -> float:
    with_loss = [r for r in results if r["tokens"]]
    # DP ranks each hold their own micro-batches; TP ranks of one stage hold the same ones.
    unique = {(r["loss_sum"], r["tokens"]) for r in with_loss}
    return sum(s for s, _ in unique) / sum(n for _, n in unique)


@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)])
def test_eaft_training_step_is_layout_independent(dist, tp, pp, dp):
    reference = dist.run(_eaft_train_step, 1, 1, 1, 1, EAFT, 2)[0]
    results = dist.run(_eaft_train_step, tp * pp * dp, tp, pp, dp, EAFT, 2)
    assert _global_loss(results) == pytest.approx(reference["loss"], rel=1e-5)
    for result in results:
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def _packed_vs_separate(config: EAFTConfig) -> dict[str, torch.Tensor]:
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import EAFTForwardStep

    cpu_runtime.initialize_parallel()
    model = _built_model()
    step = EAFTForwardStep(config)
    data = tiny_gpt.batch(3)
    lengths = [12, 9, 11]
    cu_seqlens = torch.tensor([0, 12, 21, 32], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed = {
        "tokens": data["tokens"][:1],
        "labels": data["labels"][:1],
        "loss_mask": data["loss_mask"][:1],
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
    }
    with torch.no_grad():
        output, loss_func = step(iter([packed]), model)
        packed_sum, packed_tokens, packed_report = loss_func(output)
        separate_sum = torch.zeros(())
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            doc = {k: v[:, start:end] for k, v in packed.items() if k != "cu_seqlens"}
            doc["position_ids"] = torch.arange(end - start).unsqueeze(0)
            output, loss_func = step(iter([doc]), model)
            separate_sum += loss_func(output)[0]
        model.eval()
        output, loss_func = step(iter([packed]), model)
        eval_sum, _, _ = loss_func(output)
    return {
        "packed": packed_sum,
        "separate": separate_sum,
        "tokens": packed_tokens,
        "report": packed_report,
        "eval": eval_sum,
    }


def test_packed_rows_equal_separate_documents_and_eval_is_plain_ce(dist):
    result = dist.run(_packed_vs_separate, 1, EAFT)[0]
    torch.testing.assert_close(result["packed"], result["separate"], rtol=1e-5, atol=1e-5)
    report = result["report"]
    assert set(report) == {
        "lm loss",
        "eaft loss",
        "eaft/mean_weight",
        "eaft/mean_entropy",
        "eaft/confident_conflict_frac",
    }
    for value in report.values():
        assert value.shape == (2,) and value[1] == result["tokens"]
    torch.testing.assert_close(report["eaft loss"][0], result["packed"])
    torch.testing.assert_close(result["eval"], report["lm loss"][0])
    assert 0 < report["eaft/mean_weight"][0] / report["eaft/mean_weight"][1] <= 1
