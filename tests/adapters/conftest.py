"""The Megatron-Bridge worker pool, shared by the Bridge adapter and finetune() tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megatron_eaft.megatron.launcher import WorkerPool
from tests.adapters import bridge_support


@pytest.fixture(scope="package")
def bridge_dist() -> Iterator[WorkerPool]:
    """Workers that import megatron.bridge (with the TE placeholder), thrown away afterwards."""

    def unavailable(reason: str) -> None:
        if bridge_support.bridge_required():
            pytest.fail(f"{reason} (and {bridge_support.REQUIRE_ENV} is set)")
        pytest.skip(reason)

    if not bridge_support.bridge_installed():
        unavailable("megatron.bridge is not installed (uv sync --extra bridge)")
    pool = WorkerPool(2)
    try:
        # Both workers import Bridge now, side by side, not one of them inside a later test.
        problem = next(filter(None, pool.run(bridge_support.probe_import, 2)), "")
        if problem:
            unavailable(f"megatron.bridge cannot be imported: {problem}")
        yield pool
    finally:
        pool.close()
