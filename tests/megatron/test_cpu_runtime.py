"""The CPU runtime runs Megatron-Core's real training step; the launcher surfaces failures."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron_eaft.megatron import launcher
from megatron_eaft.megatron.launcher import RankError, WorkerPool
from tests.megatron import tiny_gpt


def _train_step(tp: int, pp: int, distributed_optimizer: bool) -> dict[str, float]:
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    return tiny_gpt.one_training_step(distributed_optimizer=distributed_optimizer)


@pytest.mark.parametrize(
    ("tp", "pp", "distributed_optimizer"),
    [(1, 1, False), (2, 1, False), (2, 1, True), (2, 2, True)],
)
def test_training_step_runs_and_matches_tp1(dist, tp, pp, distributed_optimizer):
    reference = dist.run(_train_step, 1, 1, 1, False)[0]
    results = dist.run(_train_step, tp * pp, tp, pp, distributed_optimizer)
    last_stage = results[-1]
    assert last_stage["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert last_stage["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert last_stage["update_successful"]


def _fork_draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=2)
    outside_before = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    outside_after = torch.rand(4)
    del parallel_state
    return outside_before, inside, outside_after


def test_rng_tracker_forks_per_tensor_parallel_rank(dist):
    (a0, in0, b0), (a1, in1, b1) = dist.run(_fork_draws, 2)
    assert torch.equal(a0, a1) and torch.equal(b0, b1), "data-parallel stream must agree"
    assert not torch.equal(in0, in1), "model-parallel stream must differ across TP ranks"
    torch.manual_seed(1234)
    expected_outside = torch.rand(8)
    assert torch.equal(torch.cat([a0, b0]), expected_outside), "fork must restore the CPU stream"


@pytest.fixture(scope="module")
def light_pool():
    """Workers without megatron: the launcher's failure handling, with cheap replacements."""
    with WorkerPool(2, preload_megatron=False) as pool:
        yield pool


def _fail_on_rank_one() -> int:
    rank = torch.distributed.get_rank()
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    torch.distributed.barrier()  # rank 0 waits here for a partner that never comes
    return rank


def _fail_on_every_rank() -> None:
    raise ValueError(f"deliberate failure on rank {torch.distributed.get_rank()}")


def _rank() -> int:
    return torch.distributed.get_rank()


def _rank_and_pid() -> tuple[int, int]:
    return torch.distributed.get_rank(), os.getpid()


def test_rank_exception_is_reraised_and_pool_recovers(light_pool):
    with pytest.raises(RankError, match="deliberate failure on rank 1") as info:
        light_pool.run(_fail_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1
    assert isinstance(info.value.exception, ValueError)
    assert light_pool.run(_rank, 2) == [0, 1]


def _hang_on_rank_zero() -> None:
    if torch.distributed.get_rank() == 0:
        time.sleep(600)  # never reports back: only killing it frees the worker
    raise ValueError("deliberate failure on rank 1")


def test_a_rank_that_never_returns_is_replaced_and_the_others_kept(light_pool, monkeypatch):
    monkeypatch.setattr(launcher, "_FAILURE_GRACE_S", 1.0)
    before = light_pool.run(_rank_and_pid, 2)
    with pytest.raises(RankError, match="deliberate failure on rank 1"):
        light_pool.run(_hang_on_rank_zero, 2, timeout=60)
    after = light_pool.run(_rank_and_pid, 2)
    assert [rank for rank, _ in after] == [0, 1]
    assert after[0][1] != before[0][1] and after[1][1] == before[1][1]


def test_ranks_that_raise_cleanly_are_kept(light_pool):
    before = light_pool.run(_rank_and_pid, 2)
    with pytest.raises(RankError, match=r"deliberate failure on rank [01]"):  # first to report
        light_pool.run(_fail_on_every_rank, 2, timeout=60)
    assert light_pool.run(_rank_and_pid, 2) == before


_KEPT_THREADS: list = []


def _leave_threads_behind(count: int) -> None:
    """What a job leaking process groups does to its worker: threads that outlive the job."""
    import threading

    stop = threading.Event()
    for _ in range(count):
        thread = threading.Thread(target=stop.wait, daemon=True)
        thread.start()
        _KEPT_THREADS.append(thread)


def test_a_worker_left_with_too_many_threads_is_replaced_after_its_job(light_pool):
    before = light_pool.run(_rank_and_pid, 2)
    light_pool.run(_leave_threads_behind, 1, launcher.RETIRE_ABOVE_THREADS)
    after = light_pool.run(_rank_and_pid, 2)
    assert after[0][1] != before[0][1], "rank 0's worker kept its leaked threads"
    assert after[1][1] == before[1][1], "rank 1's worker was healthy and should be kept"


_MODULE_STATE: list[int] = []


def _remember_a_job() -> tuple[int, int]:
    """A job leaving process-wide state behind: how many jobs this process ran, and its pid."""
    _MODULE_STATE.append(1)
    return len(_MODULE_STATE), os.getpid()


def test_restart_runs_the_next_job_in_new_processes_without_earlier_state(light_pool):
    light_pool.run(_remember_a_job, 2)
    before = light_pool.run(_remember_a_job, 2)
    assert [jobs for jobs, _ in before] == [2, 2]  # reused workers keep what jobs left
    light_pool.restart()
    after = light_pool.run(_remember_a_job, 2)
    assert [jobs for jobs, _ in after] == [1, 1]
    assert {pid for _, pid in after}.isdisjoint(pid for _, pid in before)


def _pinned_copies() -> tuple[bool, bool, str]:
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.apply_cpu_patches()
    # NeMo's strategy logs every scalar as torch.tensor(x, pin_memory=True).to("cuda").
    scalar = torch.tensor(2.0, pin_memory=True).to("cuda", non_blocking=True)
    pinned = torch.ones(3).pin_memory()
    return scalar.is_pinned(), pinned.is_pinned(), str(scalar.device)


def test_pin_memory_requests_are_dropped_on_cpu(dist):
    scalar_pinned, tensor_pinned, device = dist.run(_pinned_copies, 1)[0]
    assert (scalar_pinned, tensor_pinned, device) == (False, False, "cpu")
