"""Diagnostics are logged once per job: the reporting rank writes, the others stay quiet."""

from __future__ import annotations

import logging

from megatron_eaft import log


def test_only_the_reporting_rank_logs_unless_asked(monkeypatch, capsys):
    log.configure()
    log.configure()  # idempotent: one handler, one line per event
    logger = logging.getLogger("megatron_eaft.tests")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    logger.info("from rank 0")
    monkeypatch.setenv("RANK", "1")
    logger.info("from rank 1")
    logger.warning("everywhere", extra=log.ALL_RANKS)
    assert capsys.readouterr().err.splitlines() == [
        "[rank 0] megatron-eaft: from rank 0",
        "[rank 1] megatron-eaft: everywhere",
    ]
