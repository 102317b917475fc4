"""numpy's classic ``argsort`` (``kind="quicksort"``, the default): an introsort whose order
of equal values is fixed by the algorithm, not by the indices.

The authors pick each landmark's neighbours with ``np.argsort(distances)`` (docs/method.md, the
authors' landmarks); grid landmarks have many exactly equal distances, so which neighbours are
taken is decided by how this sort moves equal values. numpy since 1.25 sends the default sort
of 64-bit values to vectorised x86 code (AVX-512, AVX2) where the CPU has it, which orders
ties differently again; the classic algorithm below is what numpy runs without them, and what
it ran everywhere before, so the neighbours it gives do not depend on the machine.

Median-of-three quicksort down to partitions of 16 or fewer, then insertion sort; heapsort when the
recursion gets deeper than twice log2(n) (numpy's ``npysort/quicksort.cpp``, ``aquicksort_``,
and ``npysort/heapsort.cpp``, ``aheapsort_``).
"""
from __future__ import annotations

import numpy as np

_SMALL_QUICKSORT = 15


def classic_argsort(values: np.ndarray) -> np.ndarray:
    """Indices that sort the 1-D ``values`` ascending, ties as numpy's classic introsort
    leaves them (int64). Values must not be NaN."""
    v = np.asarray(values).tolist()
    order = list(range(len(v)))
    stack: list[tuple[int, int, int]] = []
    left, right, depth = 0, len(v) - 1, 2 * (len(v).bit_length() - 1)
    while True:
        if depth < 0:
            _heapsort(v, order, left, right)
        else:
            while right - left > _SMALL_QUICKSORT:
                middle = left + ((right - left) >> 1)
                if v[order[middle]] < v[order[left]]:
                    order[middle], order[left] = order[left], order[middle]
                if v[order[right]] < v[order[middle]]:
                    order[right], order[middle] = order[middle], order[right]
                if v[order[middle]] < v[order[left]]:
                    order[middle], order[left] = order[left], order[middle]
                pivot = v[order[middle]]
                i, j = left, right - 1
                order[middle], order[j] = order[j], order[middle]
                while True:
                    i += 1
                    while v[order[i]] < pivot:
                        i += 1
                    j -= 1
                    while pivot < v[order[j]]:
                        j -= 1
                    if i >= j:
                        break
                    order[i], order[j] = order[j], order[i]
                order[i], order[right - 1] = order[right - 1], order[i]
                depth -= 1
                if i - left < right - i:  # the larger part waits on the stack
                    stack.append((i + 1, right, depth))
                    right = i - 1
                else:
                    stack.append((left, i - 1, depth))
                    left = i + 1
            for i in range(left + 1, right + 1):  # insertion sort
                moving = order[i]
                j = i
                while j > left and v[moving] < v[order[j - 1]]:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = moving
        if not stack:
            return np.asarray(order, dtype=np.int64)
        left, right, depth = stack.pop()


def _heapsort(v: list, order: list[int], left: int, right: int) -> None:
    """numpy's ``aheapsort_`` on ``order[left:right + 1]`` (1-based heap over that slice)."""
    n = right - left + 1
    a = lambda k: left + k - 1  # noqa: E731  heap position k -> list index

    def sift(start: int, size: int, moving: int) -> None:
        i, j = start, start << 1
        while j <= size:
            if j < size and v[order[a(j)]] < v[order[a(j + 1)]]:
                j += 1
            if v[moving] < v[order[a(j)]]:
                order[a(i)] = order[a(j)]
                i, j = j, j + j
            else:
                break
        order[a(i)] = moving

    for start in range(n >> 1, 0, -1):
        sift(start, n, order[a(start)])
    while n > 1:
        moving = order[a(n)]
        order[a(n)] = order[a(1)]
        n -= 1
        sift(1, n, moving)
