"""Importing the real megatron.bridge on a machine without CUDA, confined to test workers.

megatron-bridge 0.6 imports ``transformer_engine.pytorch`` unconditionally (its LoRA layers,
reached from ``import megatron.bridge``), and Transformer Engine cannot be installed without
CUDA. :func:`import_bridge` inserts a placeholder module for exactly that import, imports
Bridge, and removes the placeholder again. Megatron-Core probes for Transformer Engine when its
modules are first imported, so the modules our tests use are imported *before* the placeholder
appears (they keep their TE-less code paths), and the whole thing runs only in a dedicated
worker pool that is thrown away after the Bridge tests: neither the pytest process nor the
shared ``dist`` workers ever see the placeholder or Bridge.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Iterator

# Import these before the placeholder exists: each probes for Transformer Engine on import.
_TE_PROBING_MODULES = (
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.extensions.transformer_engine_spec_provider",
    "megatron.core.pipeline_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.training",
)
BRIDGE_MODULES = (
    "megatron.bridge",
    "megatron.bridge.training.gpt_step",
    "megatron.bridge.training.state",
    "megatron.bridge.training.config",
    "megatron.bridge.training.utils.train_utils",
    "megatron.bridge.training.utils.packed_seq_utils",
    "megatron.bridge.recipes.common",
    "megatron.bridge.models",
)
# Set in CI so that a broken Bridge install fails the tests instead of skipping them.
REQUIRE_ENV = "MEGATRON_EAFT_REQUIRE_BRIDGE"


def bridge_installed() -> bool:
    """Whether megatron.bridge is installed, without importing it into this process."""
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except ModuleNotFoundError:
        return False


def bridge_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _placeholder(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    return module


@contextlib.contextmanager
def transformer_engine_placeholder() -> Iterator[None]:
    """``transformer_engine.pytorch`` as far as megatron.bridge's import needs it: LoRA layer
    annotations name ``te.ops.Sequential``. Anything that really uses TE still fails."""
    names = ("transformer_engine", "transformer_engine.pytorch")
    saved = {name: sys.modules.get(name) for name in names}
    package, pytorch = _placeholder(names[0]), _placeholder(names[1])
    pytorch.ops = types.SimpleNamespace(Sequential=type("Sequential", (), {}))
    package.pytorch = pytorch
    sys.modules.update(dict(zip(names, (package, pytorch), strict=True)))
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_bridge() -> None:
    """Import megatron.bridge (idempotent). Call only inside a throw-away worker process."""
    if "megatron.bridge.training.gpt_step" in sys.modules:
        return
    for name in _TE_PROBING_MODULES:
        importlib.import_module(name)
    with transformer_engine_placeholder():
        for name in BRIDGE_MODULES:
            importlib.import_module(name)


# Megatron's GPTModel sets these for the attention backend it is built with, and asserts that
# they agree with the next model's backend: a model an earlier job built in this worker would
# make the next job's model refuse to build.
ATTENTION_BACKEND_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def own_environment() -> Iterator[None]:
    """A worker job that starts without the attention-backend variables and leaves the
    process environment as it found it (Megatron and Bridge recipes set variables), torch's
    deterministic-algorithms switch included (Bridge turns it on for a deterministic model)."""
    import torch

    environment = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    for name in ATTENTION_BACKEND_VARIABLES:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.use_deterministic_algorithms(deterministic)


def probe_import() -> str:
    """'' when megatron.bridge imports here, else the import error (a worker job)."""
    try:
        import_bridge()
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return ""
