"""A rank's exception reaches the caller even when it cannot be rebuilt from its pickle."""

from __future__ import annotations

import pytest

from megatron_eaft.megatron.launcher import RankError, WorkerPool


class _TwoArgumentError(ValueError):
    """Pickles, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")


def _raise_two_argument_error() -> None:
    raise _TwoArgumentError("train.iterations", "deliberate")


def test_an_exception_that_does_not_unpickle_still_reports_its_traceback():
    with WorkerPool(1, preload_megatron=False) as pool:
        with pytest.raises(RankError, match=r"_TwoArgumentError: train\.iterations: deliberate"):
            pool.run(_raise_two_argument_error, 1, timeout=60)
        assert pool.run(sorted, 1, [2, 1]) == [[1, 2]]  # the pool goes on
