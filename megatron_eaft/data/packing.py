"""Assigning samples to fixed-length rows: first-fit decreasing, greedy, or one per row.

A sample's size is the number of row positions it occupies (its token count minus one: see
`megatron_eaft.data.sft_dataset` for the shift). Rows hold at most `capacity` positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

PackingMode = Literal["first-fit", "greedy", "pad"]
PACKING_MODES: tuple[str, ...] = ("first-fit", "greedy", "pad")


class _FreeSpaceTree:
    """Max-segment tree over the free space of `num_bins` bins.

    Finds the leftmost bin with room for an item in O(log bins), which is what makes first-fit
    affordable on millions of samples. Unopened bins are simply empty ones at the right.
    """

    def __init__(self, num_bins: int, capacity: int) -> None:
        self.leaves = 1
        while self.leaves < num_bins:
            self.leaves *= 2
        self.free = [capacity] * (2 * self.leaves)

    def place(self, size: int) -> int:
        """Puts an item into the leftmost bin with room; returns that bin's index."""
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= size else 2 * node + 1
        self.free[node] -= size
        bin_index = node - self.leaves
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return bin_index


def _check_sizes(sizes: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"row capacity must be positive, got {capacity}")
    for index, size in enumerate(sizes):
        if not 1 <= size <= capacity:
            raise ValueError(f"sample {index} has size {size}, outside [1, {capacity}]")


def pack_first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest samples first, each into the first row with room (rows in opening order).

    Within a row, samples keep their input order.
    """
    _check_sizes(sizes, capacity)
    if not sizes:
        return []
    tree = _FreeSpaceTree(len(sizes), capacity)
    rows: list[list[int]] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        row = tree.place(sizes[index])
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
    return [sorted(row) for row in rows]


def pack_greedy(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Samples in input order; a new row starts when the next sample does not fit."""
    _check_sizes(sizes, capacity)
    rows: list[list[int]] = []
    free = 0
    for index, size in enumerate(sizes):
        if size > free:
            rows.append([])
            free = capacity
        rows[-1].append(index)
        free -= size
    return rows


def pack(sizes: Sequence[int], capacity: int, mode: PackingMode) -> list[list[int]]:
    """Rows of sample indices for the given packing mode ("pad": one sample per row)."""
    if mode == "first-fit":
        return pack_first_fit_decreasing(sizes, capacity)
    if mode == "greedy":
        return pack_greedy(sizes, capacity)
    if mode == "pad":
        _check_sizes(sizes, capacity)
        return [[index] for index in range(len(sizes))]
    raise ValueError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
