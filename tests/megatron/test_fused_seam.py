"""eaft fused_output inside a GPTModel equals the unfused seam: the loss, the per-token
statistics and every parameter's gradient, tied and untied embeddings, with DDP's main_grad
under gradient-accumulation fusion, the gradients recomputed in backward or formed in the
forward pass (fused_gradient); and the processor equals ColumnParallelLinear + the loss
under sequence parallelism (a CPU GPTModel cannot run SP: its local norms refuse it).

One pool job per TP size builds the tiny model for each case and runs both paths on it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_eaft.ops import EAFTConfig
from tests.megatron import tiny_gpt
from tests.ops.cases import CountedRecomputes

CONFIGS = (
    EAFTConfig(kind="eaft", topk=8, check_finite=True),
    EAFTConfig(kind="eaft", entropy="exact", norm="lnv", check_finite=True),
    EAFTConfig(kind="masked", topk=8, masked_entropy_threshold=0.5, masked_prob_threshold=0.5),
    EAFTConfig(kind="sft", diagnostics=False),
)
# 64 tokens per micro-batch: 24 does not divide them.
CHUNK_TOKENS = 24


def _model(tied: bool):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = tiny_gpt.tiny_config()
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=True),
        vocab_size=tiny_gpt.VOCAB,
        max_sequence_length=tiny_gpt.SEQ,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=tied,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    tiny_gpt.load_layout_independent_weights(model)
    return model


def _forward_backward(model, config: EAFTConfig, data: dict, give_mask: bool = False) -> dict:
    """One forward and backward of ``sum(loss * loss_mask)``; ``give_mask``: the model is given
    the loss mask too (as our forward steps do), which fused_gradient: forward needs."""
    from megatron_eaft.megatron.loss import install_eaft_loss

    handle = install_eaft_loss(model, config)
    try:
        model.zero_grad(set_to_none=True)
        mask = {"loss_mask": data["loss_mask"]} if give_mask else {}
        with CountedRecomputes() as recomputes:
            loss = model(data["tokens"], data["position_ids"], None, labels=data["labels"], **mask)
            (loss * data["loss_mask"]).sum().backward()
    finally:
        handle.remove()
    stats = getattr(loss, "eaft_stats", None)
    return {
        "recomputes": recomputes.count,
        "loss": loss.detach(),
        "stats": None if stats is None else stats._replace(loss=stats.loss.detach()),
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
    }


def _compare_paths(tp: int) -> list[dict]:
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp)
    data = tiny_gpt.batch(1)
    results = []
    for tied in (False, True):
        model = _model(tied)
        for config in CONFIGS:
            fused_config = dataclasses.replace(
                config, fused_output=True, fused_chunk_tokens=CHUNK_TOKENS
            )
            formed_config = dataclasses.replace(fused_config, fused_gradient="forward")
            unfused = _forward_backward(model, config, data)
            label = f"{config.kind}/{config.entropy} tied={tied} TP={tp}"
            results.append(
                {
                    "label": label,
                    "unfused": unfused,
                    "fused": _forward_backward(model, fused_config, data),
                    "mask": None,
                }
            )
            results.append(
                {
                    "label": f"{label} fused_gradient=forward",
                    "unfused": unfused,
                    "fused": _forward_backward(model, formed_config, data, give_mask=True),
                    "mask": data["loss_mask"].bool(),
                }
            )
    return results


def assert_same_stats(got, expected, label: str) -> None:
    """Per-token statistics (TokenLoss) of the two paths, fp32 to 1e-5."""
    for name in expected._fields:
        torch.testing.assert_close(
            getattr(got, name),
            getattr(expected, name),
            rtol=1e-5,
            atol=1e-5,
            equal_nan=True,
            msg=f"{name} {label}",
        )


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """fp32 to 1e-5 of the gradient's scale: the chunked GEMMs sum in another order, and
    the difference goes through the whole network's backward."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale + 1e-12, msg=label)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_output_equals_the_unfused_seam(dist, tp):
    for rank_results in dist.run(_compare_paths, tp, tp):
        for case in rank_results:
            label, unfused, fused = case["label"], case["unfused"], case["fused"]
            # Given the loss mask, the fused loss has weight 0 where it is 0 (and the loss
            # function multiplies by it): compare the positions with loss.
            mask = case["mask"]

            def with_loss(values, mask=mask):
                return values if mask is None else values[mask]

            torch.testing.assert_close(
                with_loss(fused["loss"]),
                with_loss(unfused["loss"]),
                rtol=1e-5,
                atol=1e-5,
                msg=label,
            )
            assert (fused["stats"] is None) == (unfused["stats"] is None), label
            if unfused["stats"] is not None:
                assert_same_stats(
                    type(fused["stats"])(*map(with_loss, fused["stats"])),
                    type(unfused["stats"])(*map(with_loss, unfused["stats"])),
                    label,
                )
            # Formed in the forward pass: no backward recomputation of the logits.
            assert fused["recomputes"] == (0 if mask is not None else 1), label
            assert fused["grads"].keys() == unfused["grads"].keys()
            for name, grad in unfused["grads"].items():
                assert_grad_close(fused["grads"][name], grad, f"{name} {label}")


def _main_grad_step(tp: int, tied: bool, gradient: str) -> dict:
    """Through Megatron's DDP (fp32 main_grad buffers): unfused, then fused with the output
    layer's gradient_accumulation_fusion on (the fused path adds into main_grad; formed in the
    forward pass, in backward)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import install_eaft_loss

    cpu_runtime.initialize_parallel(tp=tp)
    data = tiny_gpt.batch(2)
    config = CONFIGS[0]
    main_grads = {}
    for fused in (False, True):
        model = _model(tied)
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
        )
        if fused:
            model.output_layer.gradient_accumulation_fusion = True
        ddp.zero_grad_buffer()
        fused_config = dataclasses.replace(
            config, fused_output=fused, fused_chunk_tokens=CHUNK_TOKENS, fused_gradient=gradient
        )
        install_eaft_loss(model, fused_config)
        loss = ddp(
            data["tokens"],
            data["position_ids"],
            None,
            labels=data["labels"],
            loss_mask=data["loss_mask"],
        )
        (loss * data["loss_mask"]).sum().backward()
        main_grads[fused] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        output_weight = (
            model.shared_embedding_or_output_weight() if tied else model.output_layer.weight
        )
        main_grads[f"added by fused={fused}"] = output_weight.grad_added_to_main_grad
    return main_grads


@pytest.mark.parametrize(
    ("tied", "gradient"), [(False, "recompute"), (True, "recompute"), (True, "forward")]
)
def test_fused_output_adds_into_main_grad_like_megatron(dist, tied, gradient):
    for main_grads in dist.run(_main_grad_step, 2, 2, tied, gradient):
        assert main_grads["added by fused=True"] and not main_grads["added by fused=False"]
        for name, grad in main_grads[False].items():
            assert_grad_close(main_grads[True][name], grad, name)


def _refused(setting: str) -> str:
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import install_eaft_loss

    cpu_runtime.initialize_parallel()
    model = _model(False)
    if setting == "mup":
        model.config.use_mup = True
    else:
        model.config.defer_embedding_wgrad_compute = True
    try:
        install_eaft_loss(model, EAFTConfig(fused_output=True))
    except ValueError as error:
        return str(error)
    return ""


def test_unsupported_output_layers_are_refused_by_name(dist):
    assert "MuP" in dist.run(_refused, 1, "mup")[0]
    assert "defer_embedding_wgrad_compute" in dist.run(_refused, 1, "defer")[0]


def _sequence_parallel_processor(tp: int) -> list[dict]:
    """ColumnParallelLinear with sequence_parallel (all-gather in, reduce-scatter of the input
    grad) then the unfused loss, against the fused processor on the same layer. Megatron's SP
    mappings allocate on torch.cuda.current_device() and reduce-scatter, which gloo lacks: both
    are emulated here, for this job only (the pool's workers are reused)."""
    from unittest import mock

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, layers, mappings

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import fused_output_processor
    from megatron_eaft.ops import vocab_parallel_weighted_cross_entropy

    def reduce_scatter(output, input_, group=None, async_op=False):
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        output.copy_(total.chunk(group.size())[group.rank()])

        class Done:
            def wait(self):
                return None

        return Done() if async_op else None

    cpu_runtime.initialize_parallel(tp=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    config = tiny_gpt.tiny_config()
    config.sequence_parallel = True
    results = []
    with (
        mock.patch("torch.cuda.current_device", lambda: "cpu"),
        mock.patch.object(mappings, "dist_reduce_scatter_func", reduce_scatter),
        mock.patch.object(layers, "dist_reduce_scatter_func", reduce_scatter),
    ):
        layer = ColumnParallelLinear(
            64,
            tiny_gpt.VOCAB,
            config=config,
            init_method=torch.nn.init.normal_,
            bias=False,
            gather_output=False,
            tp_group=group,
        )
        torch.manual_seed(0)
        full_hidden = torch.randn(tiny_gpt.SEQ, tiny_gpt.MICRO_BATCH, 64)
        hidden = full_hidden.chunk(tp)[group.rank()].contiguous()
        labels = tiny_gpt.batch(4)["labels"]
        loss_mask = tiny_gpt.batch(4)["loss_mask"]
        for eaft in CONFIGS[:2]:
            paths = {}
            for fused in (None, "recompute", "forward"):
                layer.weight.grad = None
                local = hidden.clone().requires_grad_()
                if fused:
                    loss = fused_output_processor(
                        hidden_states=local,
                        output_layer=layer,
                        output_weight=None,
                        labels=labels,
                        loss_mask=loss_mask,
                        eaft_config=dataclasses.replace(
                            eaft,
                            fused_output=True,
                            fused_chunk_tokens=CHUNK_TOKENS,
                            fused_gradient=fused,
                        ),
                        tp_group=group,
                    )
                else:
                    logits, _ = layer(local)
                    loss = vocab_parallel_weighted_cross_entropy(
                        logits, labels.t().contiguous(), eaft, group
                    ).loss.t()
                (loss * loss_mask).sum().backward()
                paths[fused] = (
                    (loss * loss_mask).detach(),
                    local.grad,
                    layer.weight.grad.clone(),
                )
            results.append({"label": f"{eaft.entropy} SP TP={tp}", "paths": paths})
    return results


def test_fused_processor_under_sequence_parallelism(dist):
    for rank_results in dist.run(_sequence_parallel_processor, 2, 2):
        for case in rank_results:
            unfused = case["paths"][None]
            for gradient in ("recompute", "forward"):
                for name, got, expected in zip(
                    ("loss", "hidden grad", "weight grad"),
                    case["paths"][gradient],
                    unfused,
                    strict=True,
                ):
                    assert_grad_close(got, expected, f"{name} {case['label']} {gradient}")
