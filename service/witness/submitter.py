"""The log's side of C2SP tlog-witness: offer each new checkpoint, with a
consistency proof from the size the witness holds, to every configured
witness, and keep the cosignatures they return.

A witness that is down, slow or refusing never stops the log: checkpoints
go on being signed and served, and `/checkpoint/witnessed` simply stays at
the last checkpoint a quorum cosigned. Every refusal is logged as an error
(a 409 fork or a 422 means someone saw a different history: never routine)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import structlog

from contracts import cosignature, note
from service.store.checkpoints import CheckpointLog, SignedCheckpoint
from service.store.tiles import TileReader

log = structlog.get_logger("consent_ledger.witnessing")

# A witness that does not answer within this long is asked again next round.
TIMEOUT_SECONDS = 10.0


@dataclass
class Witness:
    url: str
    verifier: cosignature.CosignatureVerifier
    held: int = 0  # the size this witness holds, as far as the log knows
    cosigned: int = 0  # the largest checkpoint of this log it has cosigned

    @property
    def vkey(self) -> str:
        return self.verifier.vkey


class Submitter:
    def __init__(self, checkpoints: CheckpointLog, tiles: TileReader, pool: asyncpg.Pool,
                 witnesses: list[tuple[str, str]], interval: float):
        self.checkpoints, self.tiles, self.pool, self.interval = checkpoints, tiles, pool, interval
        self.witnesses = [Witness(url, cosignature.parse_vkey(vkey)) for url, vkey in witnesses]

    async def run(self, beat: Callable[[], None]) -> None:
        """Submit the latest checkpoint every interval (under the supervisor, which logs and retries failures)."""
        cosigned = await self.checkpoints.cosigned_sizes()
        for witness in self.witnesses:
            witness.held = witness.cosigned = cosigned.get(witness.vkey, 0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)) as session:
            while True:
                latest = await self.checkpoints.latest()
                if latest.size > 0:
                    await asyncio.gather(*(self.submit(session, w, latest) for w in self.witnesses))
                beat()
                await asyncio.sleep(self.interval)

    async def submit(self, session: aiohttp.ClientSession, witness: Witness, latest: SignedCheckpoint) -> bool:
        """Offer ``latest`` to one witness; True once it is cosigned. At most one resync (409) per round."""
        for _ in range(2):
            if witness.held > latest.size:
                log.error("witness holds a larger tree than this log's latest checkpoint: this log was rolled "
                          "back or forked since that witness last cosigned it", witness=witness.url,
                          held=witness.held, size=latest.size)
                return False
            if witness.cosigned == latest.size:
                return True
            proof = (await self.tiles.consistency(self.pool, witness.held, latest.size)
                     if 0 < witness.held < latest.size else [])
            body = cosignature.AddCheckpoint(witness.held, tuple(proof), latest.note).body()
            try:
                async with session.post(witness.url, data=body, headers={"Content-Type": "text/plain"}) as r:
                    status, answer = r.status, await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("witness unreachable; trying again next round", witness=witness.url,
                            error=type(exc).__name__)
                return False
            if status == 200:
                return await self._keep(witness, latest, answer)
            if status == 409:
                try:
                    size = cosignature.parse_size_body(answer)
                except note.NoteError:
                    log.error("witness answered 409 without a size", witness=witness.url)
                    return False
                if size == witness.held:
                    log.error("witness refused: it holds this size with another root (a fork)", witness=witness.url,
                              size=size)
                    return False
                witness.held = size  # resync: it holds another size than the log thought
                continue
            log.error("witness refused the checkpoint", witness=witness.url, status=status, held=witness.held,
                      size=latest.size, reason=answer[:300].decode(errors="replace").strip())
            return False
        return False

    async def _keep(self, witness: Witness, latest: SignedCheckpoint, answer: bytes) -> bool:
        line = answer.decode(errors="replace")
        try:
            valid = witness.vkey in cosignature.cosignatures(latest.note + line, [witness.verifier])
        except note.NoteError:
            valid = False
        if not valid or not line.endswith("\n") or line.count("\n") != 1:
            log.error("witness answered 200 without a valid cosignature line for its key", witness=witness.url)
            return False
        await self.checkpoints.add_cosignature(latest.size, witness.vkey, line)
        witness.held = witness.cosigned = latest.size
        log.info("checkpoint cosigned", witness=witness.url, size=latest.size)
        return True
