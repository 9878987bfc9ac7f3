"""A C2SP log built in memory from contracts/note.py and contracts/merkle.py,
and `consent-ledger witness serve` as a subprocess on loopback: for the
witness tests and bench/witness_bench.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from contracts import cosignature, merkle, note
from contracts.entry import leaf_hash
from service.store.checkpoints import write_key

from live_server import ROOT, free_port

ORIGIN = "consent-ledger.test/log"


class Log:
    """A transparency log in memory: entries, RFC 9162 tree, signed checkpoints."""

    def __init__(self, signer: note.Signer, leaves: list[bytes] | None = None):
        self.signer = signer
        self.leaves = list(leaves or [])

    def append(self, count: int, label: str = "honest") -> Log:
        start = len(self.leaves)
        self.leaves += [leaf_hash(f"{label} entry {start + i}".encode()) for i in range(count)]
        return self

    def fork(self, at: int) -> Log:
        """The same log key after a restore to size ``at``: a different history from there."""
        return Log(self.signer, self.leaves[:at])

    @property
    def size(self) -> int:
        return len(self.leaves)

    def checkpoint(self, size: int | None = None) -> str:
        size = self.size if size is None else size
        root = merkle.root_from_leaves(self.leaves[:size])
        return note.sign(note.Checkpoint(ORIGIN, size, root).body(), [self.signer])

    def proof(self, old: int, new: int | None = None) -> tuple[bytes, ...]:
        new = self.size if new is None else new
        if old == 0:
            return ()

        def lookup(level: int, index: int) -> bytes:
            return merkle.root_from_leaves(self.leaves[index << level:(index + 1) << level])

        return tuple(merkle.consistency_proof(old, new, lookup))

    def request(self, old: int, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        return cosignature.AddCheckpoint(old, self.proof(old, size), self.checkpoint(size)).body()


class Witness:
    """``consent-ledger witness serve`` as a subprocess (``python -m service.witness``:
    the same command without loading the rest of the service's command line)."""

    def __init__(self, workdir: Path, key: Path, logs: list[str], state: Path, name: str = "w"):
        self.key, self.logs, self.state = key, logs, state
        self.log_path = workdir / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/add-checkpoint"
        self.process: subprocess.Popen | None = None

    def launch(self) -> Witness:
        args = ["serve", "--key", str(self.key), "--state", str(self.state), "--port", str(self.port)]
        for log in self.logs:
            args += ["--log", log]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "service.witness", *args],
                                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    def ready(self) -> Witness:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"witness exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("witness did not start listening in 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


def witness_key(tmp: Path, name: str) -> tuple[Path, cosignature.CosignatureVerifier]:
    signer = note.Signer.generate(name)
    path = tmp / f"{name.replace('/', '_')}.key"
    write_key(path, signer)
    return path, cosignature.Cosigner.from_signer(signer).verifier
