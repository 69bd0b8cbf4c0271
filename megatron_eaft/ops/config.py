"""The validated configuration of a token-weighted loss (EAFT and the baselines it is compared to)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

Kind = Literal["sft", "dft", "eaft", "sigmoid", "masked"]
EntropyMode = Literal["topk", "exact"]
Norm = Literal["lnk", "paper", "lnv"]
MTPMode = Literal["weighted", "plain"]
FusedGradient = Literal["recompute", "forward"]

KINDS: tuple[str, ...] = ("sft", "dft", "eaft", "sigmoid", "masked")
ENTROPY_MODES: tuple[str, ...] = ("topk", "exact")
NORMS: tuple[str, ...] = ("lnk", "paper", "lnv")
MTP_MODES: tuple[str, ...] = ("weighted", "plain")
FUSED_GRADIENTS: tuple[str, ...] = ("recompute", "forward")
# The EAFT authors' code divides the top-20 entropy by 3.0 rather than ln 20 = 2.9957.
PAPER_NORMALISER = 3.0


@dataclasses.dataclass(frozen=True)
class EAFTConfig:
    """How each token's cross-entropy is weighted.

    kind: sft (w = 1), dft (w = p(y_t)), eaft (w = Htilde ** alpha), sigmoid
        (w = sigmoid(sigmoid_scale * (Htilde - sigmoid_center))), masked (w = 0 where Htilde <
        masked_entropy_threshold and p(y_t) < masked_prob_threshold, else 1).
    topk: K of the top-K entropy (the paper's 20).
    alpha: exponent of EAFT^p (1 is EAFT; the paper also runs 2 and 3).
    entropy: topk (the paper's estimate from the K largest logits) or exact (full vocabulary).
    norm: lnk (divide by ln K), paper (divide by 3.0, bit-parity with published runs), lnv
        (divide by ln V; exact entropy only). Exact entropy divided by ln K or 3.0 is clipped to 1.
    conflict_*: a token is a "confident conflict" when Htilde < conflict_entropy_threshold and
        p(y_t) < conflict_prob_threshold (diagnostic only, never changes the loss).
    diagnostics: compute entropy even when the kind does not need it (sft, dft), so runs of
        every kind report the same scalars.
    check_finite: raise if any logit is NaN or +inf, or a row has no finite logit (-inf alone
        is a legal masked-out logit); one device sync per call.
    ignore_index: label value that marks a position without loss.
    fused_output: compute the output layer and the loss together, a chunk of tokens at a time
        (megatron_eaft.ops.fused_output), so the micro-batch's logits never exist.
    fused_chunk_tokens: tokens per chunk of the fused path; 0 derives it from
        fused_chunk_memory_mib.
    fused_chunk_memory_mib: working memory of one chunk's logits (MiB) when the chunk size is
        derived.
    fused_gradient: how the fused path forms its gradients: recompute (backward recomputes
        the logits; no assumption) or forward (formed in the forward pass, one output-layer
        GEMM fewer, plus an fp32 weight-sized buffer held until backward; the weight gradient
        needs one upstream gradient for every loss-masked token, as Megatron's loss functions
        give: checked, see README).
    mtp: the loss of multi-token-prediction heads (models with MTP layers): weighted (each
        head's cross-entropy weighted like the main head's, from that head's own logits) or
        plain (Megatron's cross-entropy; the main head keeps its weighting).
    """

    kind: Kind = "eaft"
    topk: int = 20
    alpha: float = 1.0
    entropy: EntropyMode = "topk"
    norm: Norm = "lnk"
    sigmoid_scale: float = 30.0
    sigmoid_center: float = 0.17
    masked_entropy_threshold: float = 0.15
    masked_prob_threshold: float = 1.0
    conflict_entropy_threshold: float = 0.15
    conflict_prob_threshold: float = 0.15
    diagnostics: bool = True
    check_finite: bool = False
    ignore_index: int = -100
    fused_output: bool = False
    fused_chunk_tokens: int = 0
    fused_chunk_memory_mib: int = 1024
    fused_gradient: FusedGradient = "recompute"
    mtp: MTPMode = "weighted"

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, "kind", self.kind, f"one of {', '.join(KINDS)}")
        _require(self.mtp in MTP_MODES, "mtp", self.mtp, f"one of {', '.join(MTP_MODES)}")
        _require(
            self.fused_gradient in FUSED_GRADIENTS,
            "fused_gradient",
            self.fused_gradient,
            f"one of {', '.join(FUSED_GRADIENTS)}",
        )
        _require(
            self.entropy in ENTROPY_MODES,
            "entropy",
            self.entropy,
            f"one of {', '.join(ENTROPY_MODES)}",
        )
        _require(self.norm in NORMS, "norm", self.norm, f"one of {', '.join(NORMS)}")
        _require(
            self.norm != "lnv" or self.entropy == "exact",
            "norm",
            self.norm,
            "lnk or paper with entropy='topk' (ln V only normalises the exact entropy)",
        )
        _require(
            _integer(self.topk, 2),
            "topk",
            self.topk,
            "an integer >= 2",
        )
        _require(_finite(self.alpha) and self.alpha >= 0, "alpha", self.alpha, ">= 0")
        _require(
            _finite(self.sigmoid_scale) and self.sigmoid_scale > 0,
            "sigmoid_scale",
            self.sigmoid_scale,
            "> 0",
        )
        for name in (
            "sigmoid_center",
            "masked_entropy_threshold",
            "masked_prob_threshold",
            "conflict_entropy_threshold",
            "conflict_prob_threshold",
        ):
            value = getattr(self, name)
            _require(_finite(value) and 0.0 <= value <= 1.0, name, value, "in [0, 1]")
        _require(
            isinstance(self.ignore_index, int) and self.ignore_index < 0,
            "ignore_index",
            self.ignore_index,
            "a negative integer (valid labels are 0..V-1)",
        )
        _require(
            _integer(self.fused_chunk_tokens, 0),
            "fused_chunk_tokens",
            self.fused_chunk_tokens,
            "an integer >= 0 (0: from fused_chunk_memory_mib)",
        )
        _require(
            _integer(self.fused_chunk_memory_mib, 1),
            "fused_chunk_memory_mib",
            self.fused_chunk_memory_mib,
            "an integer >= 1",
        )

    @property
    def needs_entropy(self) -> bool:
        return self.diagnostics or self.kind in ("eaft", "sigmoid", "masked")

    def normaliser(self, vocab_size: int) -> float:
        """The constant the raw entropy (nats) is divided by."""
        if self.norm == "paper":
            return PAPER_NORMALISER
        if self.norm == "lnv":
            return math.log(vocab_size)
        return math.log(self.topk)

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks that need the (global, padded) vocabulary size."""
        _require(
            self.entropy != "topk" or not self.needs_entropy or self.topk <= vocab_size,
            "topk",
            self.topk,
            f"<= the vocabulary size {vocab_size}",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EAFTConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown EAFT option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"EAFTConfig.{field}={value!r} is invalid: must be {allowed}")
