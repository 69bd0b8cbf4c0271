"""Shared fixtures: one pool of gloo worker processes for every distributed test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from megatron_eaft.megatron.launcher import WorkerPool

# tests/nemo2 needs the NeMo 2 environment (Megatron-Core 0.15): `make test-nemo2` runs it there,
# with --confcutdir=tests/nemo2 so that this file (and this line) is not loaded.
collect_ignore = ["nemo2"]

# Largest layout the tests use (TP2 x PP2, TP4, DP2 x TP2).
MAX_WORLD_SIZE = 4


@pytest.fixture(scope="session")
def dist() -> Iterator[WorkerPool]:
    """`dist.run(fn, world_size, *args, **kwargs)` -> per-rank results, megatron pre-imported."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pool = WorkerPool(MAX_WORLD_SIZE)
    try:
        yield pool
    finally:
        pool.close()
