"""C2SP signed-note (Ed25519) and tlog-checkpoint bodies, with vkey text.

    checkpoint body = origin "\\n" tree-size "\\n" base64(root) "\\n"
    signed note     = body "\\n" ("— " key-name " " base64(key-id[4] || sig[64]) "\\n")+
    key ID          = SHA-256(key-name || 0x0A || 0x01 || public-key)[:4]
    vkey            = key-name "+" hex(key-id) "+" base64(0x01 || public-key)
    private key     = "PRIVATE+KEY+" key-name "+" hex(key-id) "+" base64(0x01 || seed)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "
MAX_SIGNATURES = 100


class NoteError(ValueError):
    """A note, key or checkpoint that is malformed or does not verify."""


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"bad key name {name!r}: it must be non-empty with no spaces or '+'")


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()[:4]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError(f"{what} is not valid base64") from None


@dataclass(frozen=True)
class Verifier:
    name: str
    id: bytes
    public: Ed25519PublicKey
    public_bytes: bytes

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{_b64(bytes([ED25519]) + self.public_bytes)}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, text)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    name: str
    private: Ed25519PrivateKey

    @property
    def verifier(self) -> Verifier:
        public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return Verifier(self.name, key_id(self.name, public), self.private.public_key(), public)

    def signature_line(self, text: bytes) -> str:
        v = self.verifier
        return f"{SIGNATURE_PREFIX}{self.name} {_b64(v.id + self.private.sign(text))}\n"

    @property
    def private_text(self) -> str:
        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return f"PRIVATE+KEY+{self.name}+{self.verifier.id.hex()}+{_b64(bytes([ED25519]) + seed)}"

    @classmethod
    def generate(cls, name: str) -> Signer:
        _check_name(name)
        return cls(name, Ed25519PrivateKey.generate())


def vkey_parts(text: str, key_type: int, what: str) -> tuple[str, str, bytes]:
    """Name, hex key ID (not yet checked) and 32-byte public key of a vkey of
    signature type ``key_type`` (0x01 a log key, 0x04 a cosigner's)."""
    parts = text.strip().split("+", 2)  # base64 may itself hold '+'
    if len(parts) != 3:
        raise NoteError("a vkey is name+keyid+base64key")
    name, hex_id, b64 = parts
    _check_name(name)
    raw = _unb64(b64, "vkey key")
    if len(raw) != 33 or raw[0] != key_type:
        raise NoteError(f"vkey is not {what} (type 0x{key_type:02x}) key")
    return name, hex_id, raw[1:]


def parse_vkey(text: str) -> Verifier:
    name, hex_id, public = vkey_parts(text, ED25519, "an Ed25519")
    if hex_id != key_id(name, public).hex():
        raise NoteError("vkey key ID does not match its name and key")
    return Verifier(name, bytes.fromhex(hex_id), Ed25519PublicKey.from_public_bytes(public), public)


def parse_signer(text: str) -> Signer:
    parts = text.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("a private key is PRIVATE+KEY+name+keyid+base64key")
    name, hex_id, b64 = parts[2:]
    _check_name(name)
    raw = _unb64(b64, "private key")
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("private key is not an Ed25519 (type 0x01) key")
    signer = Signer(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
    if signer.verifier.id.hex() != hex_id:
        raise NoteError("private key ID does not match its name and key")
    return signer


def sign(text: str, signers: list[Signer]) -> str:
    if not text.endswith("\n") or not signers:
        raise NoteError("note text must end with a newline and have a signer")
    data = text.encode()
    return text + "\n" + "".join(s.signature_line(data) for s in signers)


@dataclass(frozen=True)
class Signature:
    name: str
    id: bytes
    signature: bytes


def split(note: str) -> tuple[str, list[Signature]]:
    """The signed text and the signature lines, checked for form only."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note holds control characters")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note has no blank line before its signatures")
    text, sigs = note[: cut + 1], note[cut + 2 :]
    if not sigs.endswith("\n"):
        raise NoteError("note does not end with a newline")
    lines = sigs[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError("note has too many signatures")
    out = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        name, space, b64 = line[len(SIGNATURE_PREFIX):].partition(" ")
        if not space or " " in b64:
            raise NoteError("malformed signature line")
        _check_name(name)
        raw = _unb64(b64, "signature")
        if len(raw) < 5:
            raise NoteError("signature too short")
        out.append(Signature(name, raw[:4], raw[4:]))
    return text, out


def open_note(note: str, verifiers: list[Verifier]) -> tuple[str, list[Verifier]]:
    """The note text if at least one known key signed it and no known key's
    signature fails; also which known keys signed."""
    text, sigs = split(note)
    known = {(v.name, v.id): v for v in verifiers}
    good: list[Verifier] = []
    data = text.encode()
    for sig in sigs:
        v = known.get((sig.name, sig.id))
        if v is None:
            continue  # unknown keys are ignored: rotation and witnesses add lines
        if not v.verify(data, sig.signature):
            raise NoteError(f"signature by {v.name}+{v.id.hex()} does not verify")
        good.append(v)
    if not good:
        raise NoteError("no signature by a known key")
    return text, good


# --- tlog-checkpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{_b64(self.root)}\n"


def parse_checkpoint(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise NoteError("a checkpoint is at least three non-empty lines")
    origin, size_text, root_text = lines[:3]
    if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
        raise NoteError(f"bad tree size {size_text!r}")
    root = _unb64(root_text, "root hash")
    if len(root) != 32:
        raise NoteError("root hash is not 32 bytes")
    return Checkpoint(origin, int(size_text), root)


def open_checkpoint(note: str, verifiers: list[Verifier], origin: str | None = None) -> Checkpoint:
    text, _ = open_note(note, verifiers)
    checkpoint = parse_checkpoint(text)
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    return checkpoint
