"""Cohorts cut into 65,536-stem blocks, for "is this patient in that cohort".

A patient's history must find, among thousands of cohorts of millions, the
few that contain them, without a row per patient per use.  Each cohort is
stored once more, grouped by the stem's high 16 bits: a block holds the low
16 bits as sorted uint16 when sparse (2 bytes a member) or as a 65,536-bit
bitmap when dense (8 KiB), the two containers of a roaring bitmap.  A
history lookup reads only the patient's block row of each cohort, and for
bitmap rows PostgreSQL tests the bit itself (``get_bit``), so little data moves.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_BITS = 16
_LOW_MASK = (1 << BLOCK_BITS) - 1
_BITMAP_BYTES = (1 << BLOCK_BITS) // 8
ARRAY, BITMAP = "a", "b"


def split(stems: np.ndarray) -> Iterator[tuple[int, str, bytes]]:
    """(block, kind, members) for sorted unique stems."""
    stems = np.asarray(stems, dtype=np.uint32)
    if len(stems) == 0:
        return
    high = stems >> BLOCK_BITS
    low = (stems & _LOW_MASK).astype("<u2")
    starts = np.flatnonzero(np.r_[True, high[1:] != high[:-1]])
    ends = np.r_[starts[1:], len(stems)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        part = low[start:end]
        if 2 * len(part) < _BITMAP_BYTES:
            yield int(high[start]), ARRAY, part.tobytes()
        else:
            bits = np.zeros(1 << BLOCK_BITS, dtype=bool)
            bits[part] = True
            # little bit order matches PostgreSQL get_bit(bytea, n): byte n/8, bit n%8.
            yield int(high[start]), BITMAP, np.packbits(bits, bitorder="little").tobytes()


def block_of(stem: int) -> tuple[int, int]:
    return stem >> BLOCK_BITS, stem & _LOW_MASK


def contains(kind: str, members: bytes, low: int) -> bool:
    if kind == BITMAP:
        return bool(members[low >> 3] >> (low & 7) & 1)
    arr = np.frombuffer(members, dtype="<u2")
    i = int(np.searchsorted(arr, low))
    return i < len(arr) and int(arr[i]) == low
