"""Cohort commitments: a Merkle tree over salted member tags that proves, to
one patient at a time, that they were in a cohort or that they were not.

The executable form of section 8 of ``contracts/LEDGER-FORMAT.md``:

    secret      16 random bytes per patient, generated once; the log commits to
                secret_hash = SHA-256("consent-ledger/transparency-secret/v1\\n" || secret)
    cohort key  K = SHA-256("consent-ledger/cohort-key/v1\\n" || context)   (public)
    tag         AES-256(K, secret) XOR secret                              (16 bytes)
    bits        k = max(0, bit_length(floor(size / 64)) - 1)
    bucket(t)   the top k bits of t (big-endian)
    leaf b      SHA-256(0x00 || the tags in bucket b, ascending)
    root        RFC 9162 MTH over the 2^k leaf hashes

A proof for a tag is its bucket's tags plus the bucket's inclusion path: the
patient recomputes their own tag, and the same proof says "member" or "not a
member".  Because a tag's bucket is fixed by the tag itself, no root can
carry a membership proof and an absence proof for the same tag.

Why not HMAC-SHA-256 per member and one leaf per member: in CPython every
hash call costs ~1-2 us here, so a 5M-member cohort would take ~20 s of
hashing alone; one AES call over all members and one SHA-256 per bucket of
~64-128 tags take well under a second (``bench/cohort_commitment_bench.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from msgspec import Meta

from . import merkle
from .merkle import ProofError
from .values import END, Frozen, Sha256Hex

SECRET_SIZE = 16
TAG_SIZE = 16
BUCKET_TARGET = 64  # a cohort of n >= 64 members has buckets of 64 to 128 members on average
SECRET_LABEL = b"consent-ledger/transparency-secret/v1\n"
COHORT_KEY_LABEL = b"consent-ledger/cohort-key/v1\n"
LEAF_PREFIX = b"\x00"

TagHex = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}" + END, description="16-byte member tag, lowercase hex")]


class CohortProof(Frozen):
    """A bucket of a cohort commitment and its inclusion path: proves that a
    tag belonging to ``bucket`` is, or is not, among the cohort's tags."""

    bucket: Annotated[int, Meta(ge=0)]
    tags: list[TagHex]
    path: list[Sha256Hex]


# --- secrets and tags (what a patient app computes) ------------------------------------


def secret_hash(secret: bytes) -> str:
    """The value the log commits to for a patient's transparency secret."""
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"a transparency secret is {SECRET_SIZE} bytes")
    return hashlib.sha256(SECRET_LABEL + secret).hexdigest()


def cohort_key(context: str) -> bytes:
    """The public AES-256 key of one commitment, named by its context (the
    event_id of the entry that carries the commitment)."""
    return hashlib.sha256(COHORT_KEY_LABEL + context.encode()).digest()


def _aes_ecb(key: bytes, blocks: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(blocks) + encryptor.finalize()


def member_tags(secrets: np.ndarray, context: str) -> np.ndarray:
    """Tags of many members at once: one AES call over all their secrets.

    ``secrets`` is an (n, 16) uint8 array; the result has the same shape."""
    secrets = np.ascontiguousarray(secrets, dtype=np.uint8)
    if secrets.ndim != 2 or secrets.shape[1] != SECRET_SIZE:
        raise ValueError(f"secrets must be an (n, {SECRET_SIZE}) uint8 array")
    encrypted = np.frombuffer(_aes_ecb(cohort_key(context), secrets.tobytes()), dtype=np.uint8)
    return encrypted.reshape(secrets.shape) ^ secrets


def member_tag(secret: bytes, context: str) -> bytes:
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"a transparency secret is {SECRET_SIZE} bytes")
    return member_tags(np.frombuffer(secret, dtype=np.uint8).reshape(1, SECRET_SIZE), context).tobytes()


# How the service obtains secrets is not part of the format (a patient only
# needs their own secret and its commitment in the log).  Deriving them from
# one service key, rather than storing one per patient, costs one AES call
# for a whole cohort instead of millions of lookups.
_DERIVATION_PREFIX = b"cl/secret/v1"  # 12 bytes; the 4-byte stem completes the AES block


def derive_secrets(service_key: bytes, stems: np.ndarray) -> np.ndarray:
    """Patients' secrets from the service's 32-byte secret-derivation key and
    their 9-digit NHS number stems: AES-256(key, prefix || stem as uint32 BE)."""
    if len(service_key) != 32:
        raise ValueError("the secret-derivation key is 32 bytes")
    stems = np.asarray(stems)
    blocks = np.empty((len(stems), SECRET_SIZE), dtype=np.uint8)
    blocks[:, :12] = np.frombuffer(_DERIVATION_PREFIX, dtype=np.uint8)
    blocks[:, 12:] = stems.astype(">u4").view(np.uint8).reshape(-1, 4)
    return np.frombuffer(_aes_ecb(service_key, blocks.tobytes()), dtype=np.uint8).reshape(blocks.shape)


# --- the tree ------------------------------------------------------------------------------


def prefix_bits(size: int) -> int:
    """k: the tree has 2^k buckets, so that a bucket holds 64 to 128 tags on average."""
    if size < 0:
        raise ValueError("a cohort size is not negative")
    return max(0, (size // BUCKET_TARGET).bit_length() - 1)


def bucket_of(tag: bytes, bits: int) -> int:
    if len(tag) != TAG_SIZE:
        raise ValueError(f"a member tag is {TAG_SIZE} bytes")
    return int.from_bytes(tag, "big") >> (8 * TAG_SIZE - bits)


def _leaf_hash(bucket_tags: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + bucket_tags).digest()


def _parent_level(level: bytes) -> bytes:
    sha = hashlib.sha256
    return b"".join(sha(merkle.NODE_PREFIX + level[i:i + 64]).digest() for i in range(0, len(level), 64))


@dataclass(frozen=True, eq=False)
class CohortTree:
    """A built commitment.  ``tags`` are the members' tags in ascending order
    and ``order[i]`` is the input row that ``tags[i]`` came from, so a caller
    can keep its members in bucket order; bucket ``b`` holds
    ``tags[offsets[b]:offsets[b + 1]]``.  ``levels[0]`` is the concatenated
    leaf hashes, each next level their parents, ``levels[bits]`` the root."""

    size: int
    bits: int
    tags: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    levels: tuple[bytes, ...]

    @property
    def root(self) -> bytes:
        return self.levels[-1]

    def bucket_tags(self, bucket: int) -> np.ndarray:
        return self.tags[self.offsets[bucket]:self.offsets[bucket + 1]]

    def proof(self, tag: bytes) -> CohortProof:
        """The proof that ``tag`` is, or is not, a member."""
        bucket = bucket_of(tag, self.bits)
        return bucket_proof(bucket, self.bucket_tags(bucket), self.levels)


def bucket_proof(bucket: int, bucket_tags: np.ndarray, levels: tuple[bytes, ...]) -> CohortProof:
    """A proof from stored parts: one bucket's tags (ascending, (m, 16)) and
    the tree's ``levels``.  A service that keeps its members in bucket order
    (``order``, ``offsets``) and the levels can answer a patient by
    recomputing one bucket's tags instead of the whole tree."""
    bits = len(levels) - 1
    if not 0 <= bucket < 1 << bits:
        raise ProofError(f"no bucket {bucket} in a tree of {1 << bits}")
    path = []
    for level in range(bits):
        sibling = 32 * ((bucket >> level) ^ 1)
        path.append(levels[level][sibling:sibling + 32].hex())
    return CohortProof(bucket=bucket, tags=[row.tobytes().hex() for row in bucket_tags], path=path)


def _tag_order(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The permutation that sorts tags (as big-endian high and low halves), and
    the sorted sort keys: the high half with its last w bits replaced by the
    row index.  Sorting these unique integers is several times faster than an
    argsort; rows whose remaining bits tie (a handful in millions) are then
    put in full tag order one small run at a time."""
    size = len(high)
    width = max(1, (size - 1).bit_length())
    mask = np.uint64((1 << width) - 1)
    keys = (high & ~mask) | np.arange(size, dtype=np.uint64)
    keys.sort()
    order = (keys & mask).astype(np.intp)
    top = keys >> np.uint64(width)
    ties = np.flatnonzero(top[1:] == top[:-1])
    start = 0
    for i in ties.tolist():
        if i < start:
            continue  # inside a run already handled
        end = i + 1
        while end + 1 < size and top[end + 1] == top[i]:
            end += 1
        run = order[i:end + 1]
        run_high, run_low = high[run], low[run]
        inner = np.lexsort((run_low, run_high))
        if np.any((np.diff(run_high[inner]) == 0) & (np.diff(run_low[inner]) == 0)):
            raise ValueError("two members have the same tag (a secret is shared)")
        order[i:end + 1] = run[inner]
        start = end + 1
    return order, keys


def build(tags: np.ndarray) -> CohortTree:
    """The commitment to a set of member tags (an (n, 16) uint8 array, any order).

    Two members with the same tag mean two patients share a secret: refused."""
    tags = np.ascontiguousarray(tags, dtype=np.uint8)
    if tags.ndim != 2 or tags.shape[1] != TAG_SIZE:
        raise ValueError(f"tags must be an (n, {TAG_SIZE}) uint8 array")
    size = len(tags)
    if size >= 1 << 32:
        raise ValueError("a cohort commitment holds fewer than 2^32 members")
    bits = prefix_bits(size)
    halves = tags.view(">u8")  # (n, 2): big-endian halves order like the bytes do
    order, keys = _tag_order(halves[:, 0], halves[:, 1])
    # Gather whole rows as 16-byte units: four times faster than tags[order].
    sorted_tags = tags.view(f"V{TAG_SIZE}").ravel()[order].view(np.uint8).reshape(size, TAG_SIZE)
    if bits:  # the keys keep each tag's top 32 bits, and bits <= 26 here
        offsets = np.searchsorted(keys >> np.uint64(64 - bits), np.arange((1 << bits) + 1, dtype=np.uint64))
    else:
        offsets = np.array([0, size])
    data = memoryview(sorted_tags.reshape(-1))  # no copy of the tags
    bounds = (offsets * TAG_SIZE).tolist()
    levels = [b"".join(_leaf_hash(data[a:b]) for a, b in zip(bounds, bounds[1:]))]
    for _ in range(bits):
        levels.append(_parent_level(levels[-1]))
    return CohortTree(size, bits, sorted_tags, order, offsets, tuple(levels))


def _hashes(texts: list[str], size: int) -> list[bytes]:
    """Hex strings as bytes; a proof built by hand rather than decoded may hold anything."""
    try:
        out = [bytes.fromhex(t) for t in texts]
    except ValueError:
        raise ProofError("a proof holds a value that is not hex") from None
    if any(len(v) != size for v in out):
        raise ProofError(f"a proof holds a value that is not {size} bytes")
    return out


def verify(proof: CohortProof, tag: bytes, size: int, root: bytes) -> bool:
    """True if ``tag`` is a member of the cohort committed by (size, root),
    False if the proof shows it is not; ProofError if the proof is not valid."""
    bits = prefix_bits(size)
    bucket = bucket_of(tag, bits)
    if proof.bucket != bucket:
        raise ProofError(f"the proof is for bucket {proof.bucket}, but this tag belongs in bucket {bucket}")
    members, path = _hashes(proof.tags, TAG_SIZE), _hashes(proof.path, 32)
    if any(bucket_of(t, bits) != bucket for t in members):
        raise ProofError(f"bucket {bucket} holds a tag that belongs in another bucket")
    if any(a >= b for a, b in zip(members, members[1:])):
        raise ProofError(f"the tags of bucket {bucket} are not in strictly ascending order")
    leaf = _leaf_hash(b"".join(members))
    merkle.verify_inclusion(bucket, 1 << bits, leaf, path, root)
    return tag in members
