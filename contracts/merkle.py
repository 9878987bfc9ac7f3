"""RFC 9162 §2.1 Merkle tree over the ledger's leaf hashes, and C2SP tlog-tiles.

Leaf index i (0-based) holds the leaf hash of the entry at position i + 1.
Proof *generation* here is storage-agnostic: it names the perfect subtrees
it needs as (level, index) pairs, so a store can fetch them all in one
round of reads and hand them back through a lookup callback.  Proof
*verification* follows the algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # 256 hashes per full tile
HASH_SIZE = 32

Node = tuple[int, int]  # (level, index): MTH of leaves [index << level, (index + 1) << level)
Lookup = Callable[[int, int], bytes]


class ProofError(ValueError):
    """A proof that does not verify, or a request that has no proof."""


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 9162: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


# --- the tree from leaves --------------------------------------------------------


def root_from_leaves(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[0:n]) over leaf hashes, in O(n) hashing and O(log n) memory."""
    acc = CompactRange()
    for leaf in leaves:
        acc.append(leaf)
    return acc.root()


class CompactRange:
    """The roots of the perfect subtrees covering [0, size): enough to extend
    the tree one leaf at a time and to read the root at any moment."""

    __slots__ = ("size", "_stack")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def append(self, leaf: bytes) -> None:
        stack = self._stack
        h = leaf
        n = self.size
        while n & 1:
            h = node_hash(stack.pop(), h)
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


# --- naming the subtrees a proof needs ------------------------------------------------


def perfect_subtrees(start: int, end: int) -> list[Node]:
    """Aligned perfect subtrees covering [start, end), left to right, largest first.

    For a range that RFC 9162 treats as one subtree (start is a multiple of a
    power of two at least end - start), MTH(D[start:end]) is these subtrees
    folded from the right."""
    out: list[Node] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        out.append((level, start >> level))
        start += 1 << level
    return out


def range_hash(start: int, end: int, lookup: Lookup) -> bytes:
    """MTH(D[start:end]) for a subtree range of the RFC 9162 recursion."""
    if start == end:
        return EMPTY_ROOT
    nodes = [lookup(level, index) for level, index in perfect_subtrees(start, end)]
    h = nodes[-1]
    for left in reversed(nodes[:-1]):
        h = node_hash(left, h)
    return h


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The subtree ranges whose hashes make up PATH(index, D[0:size]), leaf first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start += k
    out.reverse()
    return out


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The subtree ranges whose hashes make up PROOF(old, D[0:new]) (RFC 9162 §2.1.4.1)."""
    if not 0 < old <= new:
        raise ProofError(f"no consistency proof from size {old} to {new}")
    if old == new:
        return []
    out: list[tuple[int, int]] = []
    start, end, m, complete = 0, new, old, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                out.append((start, end))
            break
        k = _largest_power_of_two_below(n)
        if m <= k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start, m, complete = start + k, m - k, False
    out.reverse()
    return out


def needed_nodes(ranges: Iterable[tuple[int, int]]) -> set[Node]:
    return {node for start, end in ranges for node in perfect_subtrees(start, end)}


def inclusion_proof(index: int, size: int, lookup: Lookup) -> list[bytes]:
    return [range_hash(s, e, lookup) for s, e in inclusion_ranges(index, size)]


def consistency_proof(old: int, new: int, lookup: Lookup) -> list[bytes]:
    return [range_hash(s, e, lookup) for s, e in consistency_ranges(old, new)]


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) -------------------------------------


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root of tree size {size}")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    if old > new:
        raise ProofError(f"tree size went backwards ({old} -> {new})")
    if old == new:
        if proof:
            raise ProofError("proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for tree size {old}")
        return
    if old == 0:
        if proof:
            raise ProofError("proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError(f"consistency proof does not reproduce the root of size {old}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not reproduce the root of size {new}")


# --- C2SP tlog-tiles ---------------------------------------------------------------------


def tile_index_path(n: int) -> str:
    """N as zero-padded 3-digit path elements, all but the last prefixed with x."""
    if n < 0:
        raise ValueError("tile index must be non-negative")
    parts = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        parts.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(parts))


def parse_tile_index(path: str) -> int:
    parts = path.split("/")
    if not parts or any(len(p) != (4 if i < len(parts) - 1 else 3) for i, p in enumerate(parts)):
        raise ValueError(f"bad tile index path {path!r}")
    value = 0
    for i, part in enumerate(parts):
        digits = part[1:] if i < len(parts) - 1 else part
        if i < len(parts) - 1 and part[0] != "x" or not digits.isdigit() or not digits.isascii():
            raise ValueError(f"bad tile index path {path!r}")
        value = value * 1000 + int(digits)
    if tile_index_path(value) != path:  # rejects x000 prefixes: one spelling per index
        raise ValueError(f"non-canonical tile index path {path!r}")
    return value


def tile_path(level: int | str, n: int, width: int = TILE_WIDTH) -> str:
    """tile/<L>/<N>[.p/<W>]; level "entries" names an entry bundle."""
    suffix = "" if width == TILE_WIDTH else f".p/{width}"
    return f"tile/{level}/{tile_index_path(n)}{suffix}"


def tile_width(level: int, n: int, size: int) -> int:
    """How many hashes tile (level, n) holds in a tree of `size` leaves (0: none)."""
    hashes_at_level = size >> (TILE_HEIGHT * level)
    return max(0, min(TILE_WIDTH, hashes_at_level - n * TILE_WIDTH))


def tiles_for(size: int) -> list[tuple[int, int, int]]:
    """Every (level, n, width) tile a tree of `size` is served as."""
    out = []
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        for n in range((count + TILE_WIDTH - 1) // TILE_WIDTH):
            out.append((level, n, tile_width(level, n, size)))
        level += 1
    return out
