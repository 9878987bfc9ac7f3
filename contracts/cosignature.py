"""C2SP tlog-cosignature (Ed25519, ``cosignature/v1``) and the request and
response bodies of C2SP tlog-witness ``add-checkpoint``.

    signed message = "cosignature/v1\\n" "time " decimal(timestamp) "\\n" checkpoint-note-text
    signature line = "— " name " " base64(key-id[4] || timestamp[8, big-endian] || ed25519-sig[64]) "\\n"
    key ID         = SHA-256(name || 0x0A || 0x04 || public-key)[:4]
    vkey           = name "+" hex(key-id) "+" base64(0x04 || public-key)

    add-checkpoint request  = "old " decimal(old-size) "\\n" (base64(hash) "\\n"){0,63} "\\n" signed-checkpoint
    200 response            = one or more cosignature lines
    409 response            = decimal(size) "\\n", Content-Type text/x.tlog.size

A witness's private key is an ordinary signed-note key file (type 0x01, as
``consent-ledger keys generate`` and Go's ``note.GenerateKey`` write it); only
the key ID and vkey of the cosigner use type 0x04.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import note
from .note import NoteError

COSIGNATURE_V1 = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = 2**63 - 1
SIGNATURE_SIZE = 8 + 64  # after the key ID: timestamp, Ed25519 signature
MAX_PROOF_LINES = 63
SIZE_MEDIA_TYPE = "text/x.tlog.size"


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([COSIGNATURE_V1]) + public).digest()[:4]


def message(text: str, timestamp: int) -> bytes:
    """What a cosigner signs for the checkpoint note text ``text`` (its lines, no signatures)."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteError(f"cosignature timestamp {timestamp} is out of range")
    return f"{HEADER}time {timestamp}\n{text}".encode()


@dataclass(frozen=True)
class CosignatureVerifier:
    name: str
    id: bytes
    public: Ed25519PublicKey
    public_bytes: bytes

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(bytes([COSIGNATURE_V1]) + self.public_bytes).decode()}"

    def timestamp(self, text: str, signature: note.Signature) -> int:
        """The time of a valid cosignature of ``text`` by this key; NoteError otherwise."""
        if (signature.name, signature.id) != (self.name, self.id):
            raise NoteError(f"signature is not by {self.name}+{self.id.hex()}")
        if len(signature.signature) != SIGNATURE_SIZE:
            raise NoteError(f"cosignature by {self.name} is not a cosignature/v1 ({len(signature.signature)} bytes)")
        (timestamp,) = struct.unpack(">Q", signature.signature[:8])
        try:
            self.public.verify(signature.signature[8:], message(text, timestamp))
        except InvalidSignature:
            raise NoteError(f"cosignature by {self.name}+{self.id.hex()} does not verify") from None
        return timestamp


@dataclass(frozen=True)
class Cosigner:
    name: str
    private: Ed25519PrivateKey

    @classmethod
    def from_signer(cls, signer: note.Signer) -> Cosigner:
        """The cosigner for a signed-note key file's Ed25519 key and name."""
        return cls(signer.name, signer.private)

    @property
    def verifier(self) -> CosignatureVerifier:
        public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return CosignatureVerifier(self.name, key_id(self.name, public), self.private.public_key(), public)

    def cosign(self, text: str, timestamp: int) -> str:
        """The signature line cosigning checkpoint note text ``text`` at ``timestamp``."""
        signed = self.private.sign(message(text, timestamp))
        blob = self.verifier.id + struct.pack(">Q", timestamp) + signed
        return f"{note.SIGNATURE_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"


def parse_vkey(text: str) -> CosignatureVerifier:
    name, hex_id, public = note.vkey_parts(text, COSIGNATURE_V1, "an Ed25519 cosignature/v1")
    if hex_id != key_id(name, public).hex():
        raise NoteError("vkey key ID does not match its name and key")
    return CosignatureVerifier(name, bytes.fromhex(hex_id), Ed25519PublicKey.from_public_bytes(public), public)


def cosignatures(signed_note: str, verifiers: list[CosignatureVerifier]) -> dict[str, int]:
    """The known cosigners (by vkey) that cosigned the note, with their timestamps.

    Lines of unknown keys (the log's own signature among them) are ignored; a
    line of a known key that does not verify makes the whole note suspect."""
    text, signatures = note.split(signed_note)
    known = {(v.name, v.id): v for v in verifiers}
    found: dict[str, int] = {}
    for signature in signatures:
        verifier = known.get((signature.name, signature.id))
        if verifier is not None:
            found[verifier.vkey] = verifier.timestamp(text, signature)
    return found


# --- tlog-witness add-checkpoint ---------------------------------------------------------


@dataclass(frozen=True)
class AddCheckpoint:
    """An add-checkpoint request: the size the client believes the witness
    holds, a consistency proof from it, and the signed checkpoint."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: str

    def body(self) -> bytes:
        lines = [f"old {self.old_size}\n"] + [base64.b64encode(h).decode() + "\n" for h in self.proof]
        return ("".join(lines) + "\n" + self.checkpoint).encode()


def _decimal(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or (text != "0" and text[0] == "0"):
        raise NoteError(f"{what} {text[:30]!r} is not a decimal number without leading zeros")
    return int(text)


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """The request, checked for form only (a malformed one is a 400)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise NoteError("request body is not UTF-8") from None
    head, blank, checkpoint = text.partition("\n\n")
    if not blank:
        raise NoteError("request has no empty line before the checkpoint")
    lines = head.split("\n")
    if not lines[0].startswith("old "):
        raise NoteError("request does not start with an 'old <size>' line")
    old_size = _decimal(lines[0][4:], "old size")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise NoteError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            digest = base64.b64decode(line, validate=True)
        except ValueError:
            raise NoteError("a consistency proof line is not base64") from None
        if len(digest) != 32:
            raise NoteError("a consistency proof line is not a 32-byte hash")
        proof.append(digest)
    note.split(checkpoint)  # a signed note in form
    return AddCheckpoint(old_size, tuple(proof), checkpoint)


def size_body(size: int) -> bytes:
    """The 409 answer: the size the witness last cosigned."""
    return f"{size}\n".encode()


def parse_size_body(body: bytes) -> int:
    text = body.decode("ascii", errors="replace")
    if not text.endswith("\n"):
        raise NoteError("a tlog size body ends with a newline")
    return _decimal(text[:-1], "tree size")
