"""Everything Megatron-Core needs to run on a machine without a GPU, in one place.

Megatron-Core assumes CUDA in a few dozen spots (``device="cuda"`` allocations in the
schedules and optimizers, ``torch.cuda.current_device()`` in the TP mappings and rotary
embedding, CUDA streams in DDP, ``torch.cuda.FloatTensor`` type checks in gradient clipping,
CUDA RNG states in the model-parallel RNG tracker). Tests, CI and the README demo run on CPU
with the gloo backend, so this module papers over exactly those spots:

* a ``TorchFunctionMode`` that maps any CUDA device argument (and ``Tensor.cuda()``) to CPU,
  drops ``pin_memory`` requests (page-locking needs the CUDA driver), and reports CPU tensors' ``type()`` under their CUDA name (the optimizers only accept those);
* ``torch.cuda`` stubs for the current device, synchronisation, streams and events;
* an RNG tracker that forks the CPU generator per named state, so dropout and weight
  initialisation under ``get_cuda_rng_tracker().fork()`` stay reproducible and TP-aware.

Nothing here is active when CUDA is available: :func:`apply_cpu_patches` returns at once, and
GPU runs take Megatron's own code paths untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
from torch.overrides import TorchFunctionMode

_PATCHED = False
_TRAINING_PATCHED = False
_BRIDGE_PATCHED = False
_NEMO2_PATCHED = False
_DEVICE_MODE: TorchFunctionMode | None = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device N" for factory functions and `.to()`.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locking needs the CUDA driver; nothing to copy to
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def _null_stream_context(stream: Any = None) -> Iterator[None]:
    yield


class CpuRNGStatesTracker:
    """Megatron's named RNG-state tracker, keeping CPU generator states instead of CUDA ones.

    ``fork(name)`` swaps the CPU generator to the named state and back, which is what
    Megatron's CUDA tracker does for the CUDA generator: TP ranks draw different dropout
    masks inside model-parallel regions and identical ones outside.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added to the tracker")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def apply_cpu_patches() -> None:
    """Make Megatron-Core runnable on CPU. Idempotent; does nothing when CUDA is available."""
    global _PATCHED, _DEVICE_MODE
    if _PATCHED or cuda_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.set_device = lambda device: None  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment, misc]
    torch.cuda.Event = _NullEvent  # type: ignore[assignment, misc]
    torch.cuda.stream = _null_stream_context  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, device="cuda": None  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    # Megatron wraps its fusions in torch.compile (megatron.core.jit.jit_fuser). On CPU,
    # inductor compiles each one per shape for seconds, more than a test, the demo or a short
    # CPU run gains back (a Qwen3.5 TP1 step: 14 s compiled, 5.6 s eager, measured), and a
    # compiled TP all-reduce deadlocked gloo ranks. Eager execution computes the same.
    torch._dynamo.config.disable = True
    _alltoall_split_sizes_as_on_gpu()
    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()
    _PATCHED = True


# ---- Megatron-LM's trainer: megatron.training.pretrain() ------------------------------------


def apply_megatron_training_cpu_patches() -> None:
    """Make Megatron-LM's ``pretrain()`` runnable on CPU (gloo). Idempotent; inert with CUDA.

    On top of :func:`apply_cpu_patches`, three spots of ``megatron.training`` assume a GPU:
    argument validation asks the GPU's architecture, ``initialize_megatron`` insists on CUDA
    and builds model-parallel groups and RNG states only when it counts a CUDA device, and
    ``pretrain`` warms up the fused kernels before the first step.
    """
    global _TRAINING_PATCHED
    if _TRAINING_PATCHED or cuda_available():
        return
    apply_cpu_patches()
    from megatron.training import arguments, training

    # validate_args picks CUDA_DEVICE_MAX_CONNECTIONS and stream-priority rules by the GPU's
    # compute capability; with no GPU to ask, answer "no architecture" (0). That keeps the
    # pre-Blackwell rules, so TP/CP still want CUDA_DEVICE_MAX_CONNECTIONS=1 (a no-op on CPU).
    arguments.get_device_arch_version = lambda: 0
    training.initialize_megatron = _initialize_megatron_without_cuda(training.initialize_megatron)
    # The warm-up compiles the torch.compile'd bias+SwiGLU and bias+dropout+add fusions for the
    # GPU. On CPU that is an inductor C++ build (~7 s of CPU per rank with a cold compile cache)
    # of kernels a CPU run switches off (--no-bias-swiglu-fusion, --no-bias-dropout-fusion).
    training.set_jit_fusion_options = _skip_jit_warm_up
    _TRAINING_PATCHED = True


def _skip_jit_warm_up(tp_size: int | None = None) -> None:
    pass


def _initialize_megatron_without_cuda(
    initialize_megatron: Callable[..., Any],
) -> Callable[..., Any]:
    """``initialize_megatron`` that runs its whole set-up (torch.distributed with the
    ``--distributed-backend`` given, model-parallel groups from the flags, seeds) on CPU."""

    @functools.wraps(initialize_megatron)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        # Megatron's own switch for runs without CUDA; it only lifts the "requires CUDA" assert.
        kwargs["allow_no_cuda"] = True
        # It builds the model-parallel groups and seeds the RNG tracker only when it counts a
        # CUDA device: count one for the duration, and seed the CPU tracker with the seed it
        # computed (+100 per pipeline stage, +10 per DP rank with --data-parallel-random-init).
        with _one_cuda_device_seeding_cpu_rng():
            return initialize_megatron(*args, **kwargs)

    return initialize


@contextlib.contextmanager
def _one_cuda_device_seeding_cpu_rng() -> Iterator[None]:
    """Count one CUDA device, and let ``model_parallel_cuda_manual_seed`` seed the CPU tracker."""
    from megatron.core import tensor_parallel

    count_cuda_devices = torch.cuda.device_count
    seed_cuda_rng = tensor_parallel.model_parallel_cuda_manual_seed
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    tensor_parallel.model_parallel_cuda_manual_seed = _seed_cpu_rng_tracker
    try:
        yield
    finally:
        torch.cuda.device_count = count_cuda_devices  # type: ignore[assignment]
        tensor_parallel.model_parallel_cuda_manual_seed = seed_cuda_rng


# ---- Megatron-Bridge's trainer: megatron.bridge.training pretrain() / finetune() ------------


def apply_bridge_cpu_patches() -> None:
    """Make Megatron-Bridge's ``pretrain()`` / ``finetune()`` runnable on CPU (gloo).

    Idempotent; inert with CUDA. Call it before ``megatron.bridge.training.pretrain`` is
    imported. On top of :func:`apply_cpu_patches`, Bridge's training set-up assumes a GPU in
    four spots (each found by removing its patch): ``pretrain.py`` imports
    ``nvidia_resiliency_ext``, a CUDA-only dependency, for a type annotation;
    ``initialize_megatron`` asserts CUDA unless told ``allow_no_cuda``, which Bridge's
    ``setup()`` does not pass; ``_set_random_seed`` seeds the model-parallel RNG tracker only
    when it counts a CUDA device; and the start-up "compiles" the dataset helpers with
    ``make``, which needs the Makefile the wheel leaves out (it ships them compiled). The
    fused-kernel warm-up is skipped as for Megatron-LM (CPU runs switch those fusions off).
    Bridge builds a model's MTP block with Transformer Engine's modules whatever its layer spec
    (:func:`_local_bridge_mtp_block_spec`).
    The run itself still needs the CPU settings: gloo, the local layer spec and attention
    backend, fusions off, fp32 (see ``tests/adapters/test_bridge_finetune.py``).
    """
    global _BRIDGE_PATCHED
    if _BRIDGE_PATCHED or cuda_available():
        return
    apply_cpu_patches()
    _provide_resiliency_ext_call_wrapper()
    from megatron.bridge.training import initialize, setup

    setup.initialize_megatron = _bridge_initialize_without_cuda(setup.initialize_megatron)
    initialize._set_random_seed = _seeding_cpu_rng_tracker(initialize._set_random_seed)
    initialize.compile_helpers = _compile_dataset_helpers_if_missing(initialize.compile_helpers)
    setup.set_jit_fusion_options = _skip_bridge_jit_warm_up
    from megatron.bridge.models import gpt_provider

    gpt_provider.mtp_block_spec = _local_bridge_mtp_block_spec(gpt_provider.mtp_block_spec)
    _BRIDGE_PATCHED = True


def _local_bridge_mtp_block_spec(mtp_block_spec: Callable[..., Any]) -> Callable[..., Any]:
    """Bridge's ``gpt_provider.mtp_block_spec`` with the local modules of our CPU specs.

    Bridge 0.6.2's provider (``GPTModelProvider.provide``, and the Qwen3.5-VL providers through
    the same module function) wraps the decoder's last layer spec in Megatron's MTP block with
    ``get_gpt_mtp_block_spec(..., use_transformer_engine=True)``: without Transformer Engine
    its ``TESpecProvider`` is None and the model build stops. Here the same layer spec (the
    provider's decoder spec, which :func:`use_bridge_cpu_model_settings` made local) is wrapped
    with the local provider of :mod:`megatron_eaft.models.cpu_specs` (its CPU RMSNorm for
    ``enorm`` / ``hnorm`` / ``final_layernorm``, zero-centred as Qwen3.5 needs), the MTP block
    our own Qwen3.5 / GLM-4.7-Flash models build, under the checkpoint keys Bridge maps.
    """

    @functools.wraps(mtp_block_spec)
    def local_mtp_block_spec(config: Any, vp_stage: int | None = None) -> Any:
        import inspect

        from megatron_eaft.models import cpu_specs

        if not getattr(config, "mtp_num_layers", None):
            return mtp_block_spec(config, vp_stage=vp_stage)
        decoder = config.transformer_layer_spec
        if callable(decoder):
            takes_vp_stage = "vp_stage" in inspect.signature(decoder).parameters
            decoder = decoder(config, vp_stage=vp_stage) if takes_vp_stage else decoder(config)
        if not getattr(decoder, "layer_specs", True):
            # A last pipeline stage holding only the MTP block: Bridge re-derives the decoder's
            # layer specs with Transformer Engine (none on CPU), so no local spec to wrap.
            raise NotImplementedError(
                "on CPU, Bridge's MTP block needs a decoder layer on its pipeline stage"
            )
        return cpu_specs.mtp_block_spec(config, decoder, "local", vp_stage)

    return local_mtp_block_spec


def _alltoall_split_sizes_as_on_gpu() -> None:
    """Give the all-to-all token dispatcher (expert or tensor parallel MoE) its split sizes
    as the numpy arrays it has on a GPU.

    ``MoEAlltoAllTokenDispatcher`` counts the tokens per rank on the device and turns the
    counts into numpy with ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which
    converts only CUDA tensors. On CPU the counts stay tensors, and ``all_to_all_single``
    refuses tensors as split sizes (TypeError; gloo itself runs uneven all-to-all). Found with
    Bridge's Qwen3.5-MoE provider at TP2 with sequence parallelism and EP2; our own MoE models
    use the same dispatcher on CPU and GPU.
    """
    from megatron.core.transformer.moe import token_dispatcher

    move_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(move_to_cpu)
    def move_as_on_gpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move_as_on_gpu


def _provide_resiliency_ext_call_wrapper() -> None:
    """A stand-in ``nvidia_resiliency_ext.inprocess`` when the package is absent: Bridge's
    ``pretrain.py`` imports ``CallWrapper`` from it only to annotate an argument that in-process
    restart (a GPU-cluster feature, off by default) fills in."""
    import importlib.util
    import sys
    import types

    try:
        if importlib.util.find_spec("nvidia_resiliency_ext.inprocess") is not None:
            return
    except ModuleNotFoundError:
        pass
    package = types.ModuleType("nvidia_resiliency_ext")
    package.__path__ = []
    inprocess = types.ModuleType("nvidia_resiliency_ext.inprocess")
    inprocess.CallWrapper = type("CallWrapper", (), {})
    package.inprocess = inprocess
    sys.modules.setdefault("nvidia_resiliency_ext", package)
    sys.modules.setdefault("nvidia_resiliency_ext.inprocess", inprocess)


def _bridge_initialize_without_cuda(
    initialize_megatron: Callable[..., Any],
) -> Callable[..., Any]:
    @functools.wraps(initialize_megatron)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    return initialize


def _seeding_cpu_rng_tracker(set_random_seed: Callable[..., Any]) -> Callable[..., Any]:
    """Bridge's ``_set_random_seed``, seeding the CPU tracker with the seed it computes."""

    @functools.wraps(set_random_seed)
    def set_seed(*args: Any, **kwargs: Any) -> Any:
        with _one_cuda_device_seeding_cpu_rng():
            return set_random_seed(*args, **kwargs)

    return set_seed


def _compile_dataset_helpers_if_missing(compile_helpers: Callable[[], None]) -> Callable[[], None]:
    @functools.wraps(compile_helpers)
    def compile_if_missing() -> None:
        import importlib.util

        if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
            compile_helpers()

    return compile_if_missing


def _skip_bridge_jit_warm_up(model_config: Any, micro_batch_size: int) -> None:
    pass


# ---- NeMo 2's trainer: nemo.collections.llm with Lightning's MegatronStrategy -------------


def apply_nemo2_cpu_patches() -> None:
    """Make NeMo 2's ``llm.finetune`` / ``llm.train`` runnable on CPU (gloo). Idempotent;
    inert with CUDA. Call it before ``megatron.core`` or ``nemo`` is imported.

    On top of :func:`apply_cpu_patches`, two spots assume a GPU:

    * Megatron-Core 0.15 (the release nemo-toolkit 2.6/2.7 run on) builds a CUDA managed-memory
      allocator with ``torch.utils.cpp_extension.load_inline`` when ``megatron.core`` is
      imported. With the CUDA toolkit but no GPU, torch finds no architecture to build for and
      raises an ``IndexError`` Megatron does not catch. Without a CUDA home the build stops with
      the ``OSError`` Megatron expects (it warns and goes on without unified memory, which CPU
      runs never use).
    * NeMo's Megatron initialisation seeds the model-parallel RNG tracker only when it counts a
      CUDA device (``_set_random_seed``), so the first layer built under the tracker fails.

    The run itself still needs the CPU settings: the Lightning trainer on
    ``accelerator="cpu"``, fp32, no Transformer Engine (an attention mask in the batches),
    fusions off, and ``sanity_check_dist_workers=False`` for NeMo's SFT datasets (its
    ``torch.cuda.LongTensor`` count); see ``tests/nemo2/finetune_run.py``.
    """
    global _NEMO2_PATCHED
    if _NEMO2_PATCHED or cuda_available():
        return
    import torch.utils.cpp_extension

    torch.utils.cpp_extension.CUDA_HOME = None
    apply_cpu_patches()
    from nemo.lightning import megatron_init

    megatron_init._set_random_seed = _seeding_cpu_rng_tracker(megatron_init._set_random_seed)
    _NEMO2_PATCHED = True


def _seed_cpu_rng_tracker(seed: int, *args: Any, **kwargs: Any) -> None:
    install_cpu_rng_tracker(seed)


def install_cpu_rng_tracker(seed: int) -> None:
    """Seed the named RNG states Megatron forks (data-parallel, tensor-parallel, expert)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    tracker = CpuRNGStatesTracker()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    # Same offsets as megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed,
    # so a CPU run draws the same streams a GPU run would name.
    tracker.add(megatron_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        megatron_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    seed: int = 1234,
    virtual_pp: int | None = None,
) -> None:
    """Initialise Megatron's model-parallel groups and RNG on an initialised process group.

    On CPU this applies the patches and installs the CPU RNG tracker; on GPU it is Megatron's
    usual ``initialize_model_parallel`` + ``model_parallel_cuda_manual_seed``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed to be initialised first")
    apply_cpu_patches()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(seed)
    if cuda_available():
        model_parallel_cuda_manual_seed(seed)
    else:
        install_cpu_rng_tracker(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def init_process_group_from_env(timeout_minutes: float = 10.0) -> None:
    """``init_process_group`` with the backend that fits the machine (env:// rendezvous)."""
    import datetime

    if torch.distributed.is_initialized():
        return
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=default_backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
    )


# Fused kernels a Bridge model provider may switch on; each needs a GPU or Transformer Engine.
_BRIDGE_GPU_FUSIONS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
    "cross_entropy_loss_fusion",
    "moe_permute_fusion",
)


def use_bridge_cpu_settings(cfg: Any) -> None:
    """Switch a Bridge ``ConfigContainer`` to what runs on CPU; does nothing with CUDA.

    gloo, the model provider's CPU settings (:func:`use_bridge_cpu_model_settings`), fp32
    weights and no mixed precision. A model in deterministic mode (the CPU Gated-DeltaNet
    path needs it) passes Bridge's check that ``NCCL_ALGO`` names a deterministic all-reduce:
    gloo runs no NCCL, so the variable is set to one of Bridge's choices unless already set.
    """
    if cuda_available():
        return
    import dataclasses

    use_bridge_cpu_model_settings(cfg.model)
    cfg.mixed_precision = None
    if dataclasses.is_dataclass(cfg.optimizer):
        cfg.optimizer.bf16 = cfg.optimizer.fp16 = False
    cfg.dist.distributed_backend = "gloo"
    if getattr(cfg.model, "deterministic_mode", False):
        os.environ.setdefault("NCCL_ALGO", "Ring")


def use_bridge_cpu_model_settings(provider: Any) -> None:
    """Switch a Bridge model provider to what builds and runs on CPU; does nothing with CUDA.

    Megatron-Core's local layer spec and attention, no fused kernels, fp32 weights. A provider
    whose decoder spec only builds with Transformer Engine gets the CPU spec of the same
    decoder (:mod:`megatron_eaft.models.cpu_specs`): Megatron's Gated-DeltaNet hybrid builder
    (Qwen3.5, Qwen3-Next) runs with the local provider and Megatron's torch GDN path, and a
    multi-latent-attention decoder (GLM-4.7-Flash) gets the CPU MLA spec with the latent norms
    at ``layernorm_epsilon``, as Megatron's own MLA specs build them. Any other spec of the
    provider's own is kept and built locally.
    """
    if cuda_available():
        return
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.transformer.enums import AttnBackend

    spec = provider.transformer_layer_spec
    if getattr(spec, "__module__", "").startswith("megatron.bridge"):
        provider.transformer_layer_spec = local_layer_spec
    elif _is_gated_delta_net_hybrid_spec(spec):
        from megatron_eaft.models import cpu_specs

        provider.transformer_layer_spec = _gated_delta_net_cpu_spec
        for field, value in cpu_specs.gated_delta_net_runtime_settings().items():
            setattr(provider, field, value)
    elif getattr(provider, "multi_latent_attention", False) and _is_gpt_decoder_block_spec(spec):
        provider.transformer_layer_spec = _mla_cpu_spec
    provider.transformer_impl = "local"
    provider.attention_backend = AttnBackend.local
    for fusion in _BRIDGE_GPU_FUSIONS:
        if hasattr(provider, fusion):
            setattr(provider, fusion, False)
    provider.bf16 = provider.fp16 = False
    provider.params_dtype = torch.float32
    provider.pipeline_dtype = None


def _is_gated_delta_net_hybrid_spec(spec: Any) -> bool:
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as variant

    return spec is variant.get_transformer_block_with_experimental_attention_variant_spec


def _is_gpt_decoder_block_spec(spec: Any) -> bool:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return getattr(spec, "func", spec) is get_gpt_decoder_block_spec


def _gated_delta_net_cpu_spec(config: Any, vp_stage: int | None = None) -> Any:
    from megatron_eaft.models import cpu_specs

    return cpu_specs.gated_delta_net_block_spec(config, "local", vp_stage)


def _mla_cpu_spec(config: Any, vp_stage: int | None = None) -> Any:
    from megatron_eaft.models import cpu_specs

    return cpu_specs.mla_decoder_block_spec(config, "local", vp_stage, config.layernorm_epsilon)
