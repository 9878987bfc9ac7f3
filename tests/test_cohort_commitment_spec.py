"""An independent verifier of cohort proofs, written only from section 8 of
contracts/LEDGER-FORMAT.md: the module under test only builds the trees and
hands out proofs; tags, roots and every check here come from the text."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from contracts import cohort_commitment  # only to build trees and produce proofs

FORMAT = (Path(__file__).resolve().parent.parent / "contracts" / "LEDGER-FORMAT.md").read_text()
CONTEXT = "0d6f2b7e-8a41-4c39-b5e2-7f0a9c3d1e58"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def secret_hash(secret: bytes) -> str:
    return sha256(b"consent-ledger/transparency-secret/v1" + b"\x0a" + secret).hex()


def tag_of(secret: bytes, context: str) -> bytes:
    key = sha256(b"consent-ledger/cohort-key/v1" + b"\x0a" + context.encode())
    # "with a CBC-only API, CBC with an all-zero IV and keep the first 16 bytes"
    encryptor = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    block = (encryptor.update(secret) + encryptor.finalize())[:16]
    return bytes(a ^ b for a, b in zip(block, secret))


def bits_for(n: int) -> int:
    return 0 if n < 128 else math.floor(math.log2(n // 64))


def bucket(tag: bytes, k: int) -> int:
    return int.from_bytes(tag, "big") // 2 ** (128 - k)


def leaf_hash(tags: list[bytes]) -> bytes:
    return sha256(b"\x00" + b"".join(tags))


def root_of(tags: list[bytes], n: int) -> bytes:
    """The whole tree, from the text: buckets, leaf hashes, halving splits."""
    k = bits_for(n)
    buckets: list[list[bytes]] = [[] for _ in range(2 ** k)]
    for t in sorted(tags):
        buckets[bucket(t, k)].append(t)
    level = [leaf_hash(b) for b in buckets]
    while len(level) > 1:
        level = [sha256(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def check(proof: dict, tag: bytes, n: int, root: bytes) -> bool | None:
    """True: a member; False: not a member; None: the proof shows nothing."""
    k = bits_for(n)
    b = bucket(tag, k)
    if proof["bucket"] != b:
        return None
    tags = []
    for text in proof["tags"]:
        if not re.fullmatch(r"[0-9a-f]{32}", text):
            return None
        tags.append(bytes.fromhex(text))
    if any(bucket(t, k) != b for t in tags) or any(x >= y for x, y in zip(tags, tags[1:])):
        return None
    h = leaf_hash(tags)
    if len(proof["path"]) != k:
        return None
    for i, sibling in enumerate(bytes.fromhex(p) for p in proof["path"]):
        h = sha256(b"\x01" + sibling + h) if (b >> i) & 1 else sha256(b"\x01" + h + sibling)
    if h != root:
        return None
    return tag in tags


def module_tree(tags: list[bytes]) -> cohort_commitment.CohortTree:
    return cohort_commitment.build(np.frombuffer(b"".join(tags), dtype=np.uint8).reshape(-1, 16))


def served(tree: cohort_commitment.CohortTree, tag: bytes) -> dict:
    """The module's proof as the JSON a patient app receives."""
    return json.loads(msgspec.json.encode(tree.proof(tag)))


def test_the_worked_example_in_the_text():
    example = re.search(
        r"secret `([0-9a-f]{32})`, context\s+`([0-9a-f-]{36})`:\s+"
        r"secret_hash = ([0-9a-f]{64})\s+K\s+= ([0-9a-f]{64})\s+tag\s+= ([0-9a-f]{32})", FORMAT)
    assert example, "the worked example of section 8.2 is missing"
    secret, context, expected_hash, expected_key, expected_tag = example.groups()
    assert secret_hash(bytes.fromhex(secret)) == expected_hash
    assert sha256(b"consent-ledger/cohort-key/v1\n" + context.encode()).hex() == expected_key
    assert tag_of(bytes.fromhex(secret), context).hex() == expected_tag
    # ... and the module agrees with the text
    assert cohort_commitment.secret_hash(bytes.fromhex(secret)) == expected_hash
    assert cohort_commitment.member_tag(bytes.fromhex(secret), context).hex() == expected_tag


@pytest.mark.parametrize("n", [0, 1, 2, 3, 64, 127, 128, 129, 255, 256, 1001])
def test_proofs_verify_with_code_written_from_the_text(n: int):
    rng = np.random.default_rng(n)
    tags = [tag_of(rng.bytes(16), CONTEXT) for _ in range(n)]
    tree = module_tree(tags)
    root = root_of(tags, n)
    assert tree.root == root
    for tag in tags[:30]:
        proof = served(tree, tag)
        assert check(proof, tag, n, root) is True
        assert check(proof, tag, n, sha256(root)) is None
    for _ in range(30):
        outsider = tag_of(rng.bytes(16), CONTEXT)
        proof = served(tree, outsider)
        assert check(proof, outsider, n, root) is False
        if proof["tags"]:  # a member dropped from the bucket no longer adds up
            assert check({**proof, "tags": proof["tags"][1:]}, outsider, n, root) is None
