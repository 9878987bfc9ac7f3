"""The Merkle tree in PostgreSQL as C2SP tlog-tiles, and proofs read from it.

Only *full* tiles are stored (``merkle_tiles``: 256 hashes, immutable), written
by the ledger writer in the same transaction as the entries that complete
them.  The rightmost, partial tile of each level is derived on demand from
the level below (leaf hashes for level 0, stored tile roots above), which is
at most 255 rows per level.  A proof therefore costs one read for the full
tiles it touches plus one per tile level (four up to 4 billion entries).
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from contracts import merkle
from contracts.merkle import TILE_HEIGHT, TILE_WIDTH, CompactRange, Node

_CACHE_LIMIT = 8192  # full tiles are immutable: keeping ~64 MB of them saves reads


def _perfect_root(hashes: list[bytes]) -> bytes:
    acc = CompactRange()
    for h in hashes:
        acc.append(h)
    return acc.root()


async def _level_hashes(conn: asyncpg.Connection, level: int, start: int, end: int) -> list[bytes]:
    """Hashes [start, end) of tile level `level` (leaf hashes at level 0, the
    roots of full tiles one level down above it)."""
    if end <= start:
        return []
    if level == 0:
        rows = await conn.fetch(
            "SELECT leaf_hash FROM ledger_events WHERE position > $1 AND position <= $2 ORDER BY position",
            start, end,
        )
        return [bytes(r[0]) for r in rows]
    rows = await conn.fetch(
        "SELECT root FROM merkle_tiles WHERE level = $1 AND n >= $2 AND n < $3 ORDER BY n",
        level - 1, start, end,
    )
    return [bytes(r[0]) for r in rows]


async def extend(conn: asyncpg.Connection, old_size: int, new_size: int, chunk_tiles: int = 64) -> None:
    """Store every tile that growing the tree from old_size to new_size completes.

    Runs inside the append transaction, after the entries are inserted."""
    level, lo, hi = 0, old_size, new_size
    while hi // TILE_WIDTH > lo // TILE_WIDTH:
        first, last = lo // TILE_WIDTH, hi // TILE_WIDTH
        for chunk in range(first, last, chunk_tiles):
            upto = min(last, chunk + chunk_tiles)
            hashes = await _level_hashes(conn, level, chunk * TILE_WIDTH, upto * TILE_WIDTH)
            if len(hashes) != (upto - chunk) * TILE_WIDTH:
                raise RuntimeError(f"tile level {level}: expected {(upto - chunk) * TILE_WIDTH} hashes, "
                                   f"found {len(hashes)}")
            rows = []
            for i, n in enumerate(range(chunk, upto)):
                tile = hashes[i * TILE_WIDTH:(i + 1) * TILE_WIDTH]
                rows.append((level, n, b"".join(tile), _perfect_root(tile)))
            await conn.copy_records_to_table("merkle_tiles", records=rows, columns=["level", "n", "hashes", "root"])
        level, lo, hi = level + 1, first, last


class TileReader:
    """Reads tiles and proof nodes for trees up to the committed head."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], bytes] = {}
        # A partial tile of a given width never changes either: the hashes
        # before the tree's edge are fixed once written.
        self._partial: dict[tuple[int, int, int], bytes] = {}
        self._known_head = 0
        # A perfect subtree's hash is fixed once its last leaf exists: warm
        # proofs are dictionary lookups.
        self._nodes: dict[Node, bytes] = {}

    async def head(self, conn: asyncpg.Connection, at_least: int) -> int:
        """The committed tree size, read only when `at_least` is beyond what we saw (it only grows)."""
        if at_least > self._known_head:
            self._known_head = await conn.fetchval("SELECT position FROM ledger_head")
        return self._known_head

    async def _partial_tile(self, conn: asyncpg.Connection, level: int, n: int, width: int) -> bytes:
        key = (level, n, width)
        data = self._partial.get(key)
        if data is None:
            hashes = await _level_hashes(conn, level, n * TILE_WIDTH, n * TILE_WIDTH + width)
            data = b"".join(hashes)
            if len(hashes) == width:
                if len(self._partial) > _CACHE_LIMIT:
                    self._partial.clear()
                self._partial[key] = data
        return data

    async def full_tiles(self, conn: asyncpg.Connection, wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        wanted = set(wanted)
        out = {k: self._cache[k] for k in wanted if k in self._cache}
        missing = sorted(wanted - out.keys())
        if missing:
            rows = await conn.fetch(
                "SELECT t.level, t.n, t.hashes FROM merkle_tiles t"
                " JOIN unnest($1::smallint[], $2::bigint[]) AS w(level, n) USING (level, n)",
                [m[0] for m in missing], [m[1] for m in missing],
            )
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            for r in rows:
                key = (r["level"], r["n"])
                out[key] = self._cache[key] = bytes(r["hashes"])
        return out

    async def tile(self, conn: asyncpg.Connection, level: int, n: int, width: int) -> bytes | None:
        """Tile bytes, or None if the tree does not (yet) have that many hashes there."""
        if width == TILE_WIDTH:
            return (await self.full_tiles(conn, [(level, n)])).get((level, n))
        data = await self._partial_tile(conn, level, n, width)
        return data if len(data) == width * 32 else None

    async def nodes(self, conn: asyncpg.Connection, size: int, wanted: set[Node]) -> dict[Node, bytes]:
        """Hashes of perfect subtrees (level, index) of the tree of `size` leaves.

        `conn` may be a pool: then a connection is taken only if something is not cached."""
        out = {node: self._nodes[node] for node in wanted if node in self._nodes}
        missing = wanted - out.keys()
        if missing:
            found = await self._read_nodes(conn, size, missing)
            if len(self._nodes) > 32 * _CACHE_LIMIT:
                self._nodes.clear()
            self._nodes.update(found)
            out.update(found)
        return out

    async def _read_nodes(self, conn: asyncpg.Connection, size: int, wanted: set[Node]) -> dict[Node, bytes]:
        by_tile: dict[tuple[int, int], list[Node]] = {}
        for level, index in wanted:
            t, r = divmod(level, TILE_HEIGHT)
            by_tile.setdefault((t, (index << r) // TILE_WIDTH), []).append((level, index))
        full = [k for k in by_tile if merkle.tile_width(k[0], k[1], size) == TILE_WIDTH]
        tiles = await self.full_tiles(conn, full)
        for key in by_tile.keys() - set(full):
            tiles[key] = await self._partial_tile(conn, key[0], key[1], merkle.tile_width(key[0], key[1], size))
        out: dict[Node, bytes] = {}
        for key, nodes in by_tile.items():
            data = tiles.get(key)
            if data is None:
                raise LookupError(f"tile {key} is missing")
            for level, index in nodes:
                r = level % TILE_HEIGHT
                first = ((index << r) % TILE_WIDTH) * 32
                span = [data[i:i + 32] for i in range(first, first + (32 << r), 32)]
                if len(span) != 1 << r or any(len(h) != 32 for h in span):
                    raise LookupError(f"subtree {(level, index)} is not in the stored tree")
                out[(level, index)] = span[0] if r == 0 else _perfect_root(span)
        return out

    async def _resolve(self, conn: asyncpg.Connection, size: int, ranges: list[tuple[int, int]]) -> list[bytes]:
        found = await self.nodes(conn, size, merkle.needed_nodes(ranges))
        return [merkle.range_hash(s, e, lambda lv, i: found[(lv, i)]) for s, e in ranges]

    async def root(self, conn: asyncpg.Connection, size: int) -> bytes:
        if size == 0:
            return merkle.EMPTY_ROOT
        return (await self._resolve(conn, size, [(0, size)]))[0]

    async def inclusion(self, conn: asyncpg.Connection, index: int, size: int) -> list[bytes]:
        return await self._resolve(conn, size, merkle.inclusion_ranges(index, size))

    async def consistency(self, conn: asyncpg.Connection, old: int, new: int) -> list[bytes]:
        return await self._resolve(conn, new, merkle.consistency_ranges(old, new))
