"""Row packing: every sample placed once, no row over capacity, first-fit cross-checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_eaft.data.packing import pack, pack_first_fit_decreasing, pack_greedy

sizes_and_capacity = st.integers(1, 50).flatmap(
    lambda capacity: st.tuples(st.lists(st.integers(1, capacity), max_size=60), st.just(capacity))
)


def naive_first_fit_decreasing(sizes, capacity):
    free: list[int] = []
    rows: list[list[int]] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for row, room in enumerate(free):  # noqa: B007 (row is used after the loop)
            if room >= sizes[index]:
                break
        else:
            row = len(free)
            free.append(capacity)
            rows.append([])
        free[row] -= sizes[index]
        rows[row].append(index)
    return [sorted(row) for row in rows]


@given(sizes_and_capacity, st.sampled_from(["first-fit", "greedy", "pad"]))
def test_rows_partition_the_samples_within_capacity(case, mode):
    sizes, capacity = case
    rows = pack(sizes, capacity, mode)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert all(row and sum(sizes[i] for i in row) <= capacity for row in rows)


@given(sizes_and_capacity)
def test_first_fit_matches_the_quadratic_algorithm(case):
    sizes, capacity = case
    assert pack_first_fit_decreasing(sizes, capacity) == naive_first_fit_decreasing(sizes, capacity)


def test_known_packings():
    sizes = [6, 5, 4, 3, 2]
    assert pack_first_fit_decreasing(sizes, 10) == [[0, 2], [1, 3, 4]]
    assert pack_greedy(sizes, 10) == [[0], [1, 2], [3, 4]]
    assert pack(sizes, 10, "pad") == [[0], [1], [2], [3], [4]]


def test_oversized_sample_is_refused():
    with pytest.raises(ValueError, match="sample 1 has size 11"):
        pack_greedy([3, 11], 10)
    with pytest.raises(ValueError, match="must be one of"):
        pack([1], 10, "best-fit")
