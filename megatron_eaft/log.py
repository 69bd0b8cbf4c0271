"""Diagnostics through :mod:`logging`, once per job rather than once per rank.

Library code calls ``logger = logging.getLogger(__name__)`` and logs as usual. Records from a rank
other than the reporting one (the last rank, where the loss lives; rank 0 before
torch.distributed starts) are dropped unless logged with ``extra=ALL_RANKS``, and each line
says which rank wrote it when the job has several. Entry points call :func:`configure` once.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "megatron_eaft"
ALL_RANKS = {"all_ranks": True}


def _rank_and_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _ReportingRankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = _rank_and_world()
        record.rank_prefix = f"[rank {rank}] " if world > 1 else ""
        if getattr(record, "all_ranks", False):
            return True
        import torch.distributed as dist

        reporting = world - 1 if dist.is_available() and dist.is_initialized() else 0
        return rank == reporting


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest, notebooks replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: int = logging.INFO) -> None:
    """One stderr handler on the package logger (idempotent): ``megatron-eaft: message``."""
    logger = logging.getLogger(ROOT)
    if any(getattr(handler, "_megatron_eaft", False) for handler in logger.handlers):
        return
    handler = _StderrHandler()
    handler._megatron_eaft = True  # type: ignore[attr-defined]
    handler.addFilter(_ReportingRankFilter())
    handler.setFormatter(logging.Formatter("%(rank_prefix)smegatron-eaft: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
