"""Cohort commitments: membership and absence proofs round-trip for every
size, and any wrong secret, tag, bucket, path, size or root is refused."""

from __future__ import annotations

import hashlib
import os
import uuid

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import cohort_commitment as cc
from contracts.merkle import ProofError

CONTEXT = "3f9a1c52-0b7e-4c1d-9e2f-5a6b7c8d9e0f"


def random_secrets(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, cc.SECRET_SIZE), dtype=np.uint8)


def commitment(n: int, seed: int) -> tuple[np.ndarray, cc.CohortTree]:
    secrets = random_secrets(n, seed)
    return secrets, cc.build(cc.member_tags(secrets, CONTEXT))


def wire(proof: cc.CohortProof) -> cc.CohortProof:
    """Every proof a test checks has been through JSON, as a patient app gets it."""
    return msgspec.json.decode(msgspec.json.encode(proof), type=cc.CohortProof)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), seed=st.integers(0, 2**32 - 1))
def test_membership_and_absence_round_trip_for_every_size(n: int, seed: int):
    secrets, tree = commitment(n, seed)
    assert tree.size == n and tree.bits == cc.prefix_bits(n)
    members = range(n) if n <= 40 else np.random.default_rng(seed).choice(n, 40, replace=False)
    for i in members:
        tag = cc.member_tag(secrets[i].tobytes(), CONTEXT)
        assert cc.verify(wire(tree.proof(tag)), tag, n, tree.root) is True
    for outsider in random_secrets(20, seed + 1):
        tag = cc.member_tag(outsider.tobytes(), CONTEXT)
        assert cc.verify(wire(tree.proof(tag)), tag, n, tree.root) is False


def test_buckets_hold_64_to_128_members_on_average():
    assert [cc.prefix_bits(n) for n in (0, 1, 63, 64, 127, 128, 255, 256, 5_000_000)] == [0, 0, 0, 0, 0, 1, 1, 2, 16]
    for n in (128, 300, 5_000_000):
        assert 64 <= n / (1 << cc.prefix_bits(n)) < 128


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_a_wrong_secret_tag_bucket_path_size_or_root_fails(n: int, seed: int, data: st.DataObject):
    secrets, tree = commitment(n, seed)
    i = data.draw(st.integers(0, n - 1))
    tag = cc.member_tag(secrets[i].tobytes(), CONTEXT)
    proof = tree.proof(tag)

    # The member's proof, tried with a wrong secret or another commitment's context:
    # never "member" (another bucket is refused; the same bucket says "absent").
    wrong_secret = bytes(b ^ 1 for b in secrets[i].tobytes())
    for other in (cc.member_tag(wrong_secret, CONTEXT), cc.member_tag(secrets[i].tobytes(), str(uuid.uuid4()))):
        try:
            assert cc.verify(proof, other, n, tree.root) is False
        except ProofError:
            pass

    tampered = []
    if proof.tags:
        flipped = format(int(proof.tags[0], 16) ^ 1, "032x")
        tampered.append(msgspec.structs.replace(proof, tags=[flipped, *proof.tags[1:]]))
        tampered.append(msgspec.structs.replace(proof, tags=proof.tags[1:]))  # a member dropped
        tampered.append(msgspec.structs.replace(proof, tags=proof.tags + proof.tags[-1:]))  # repeated
    if len(proof.tags) > 1:
        tampered.append(msgspec.structs.replace(proof, tags=proof.tags[::-1]))  # out of order
    if proof.path:
        j = data.draw(st.integers(0, len(proof.path) - 1))
        bad = format(int(proof.path[j], 16) ^ 1, "064x")
        tampered.append(msgspec.structs.replace(proof, path=proof.path[:j] + [bad] + proof.path[j + 1:]))
        tampered.append(msgspec.structs.replace(proof, path=proof.path[:-1]))
        tampered.append(msgspec.structs.replace(proof, bucket=proof.bucket ^ 1))
    tampered.append(msgspec.structs.replace(proof, path=[*proof.path, "00" * 32]))
    for bad_proof in tampered:
        with pytest.raises(ProofError):
            cc.verify(bad_proof, tag, n, tree.root)
    with pytest.raises(ProofError):
        cc.verify(proof, tag, n, bytes(32))
    other_size = n * 2 + 128  # a size with more buckets
    with pytest.raises(ProofError):
        cc.verify(proof, tag, other_size, tree.root)


def test_a_tag_of_another_bucket_smuggled_into_a_bucket_is_refused():
    secrets, tree = commitment(1000, 7)
    tag = cc.member_tag(secrets[0].tobytes(), CONTEXT)
    proof = tree.proof(tag)
    stranger = next(t for t in tree.tags if cc.bucket_of(t.tobytes(), tree.bits) != proof.bucket).tobytes()
    smuggled = sorted([*proof.tags, stranger.hex()])
    with pytest.raises(ProofError, match="belongs in another bucket"):
        cc.verify(msgspec.structs.replace(proof, tags=smuggled), tag, 1000, tree.root)


def test_the_tree_keeps_the_members_in_bucket_order():
    secrets, tree = commitment(3000, 11)
    tags = cc.member_tags(secrets, CONTEXT)
    assert np.array_equal(tags[tree.order], tree.tags)
    as_bytes = [row.tobytes() for row in tree.tags]
    assert as_bytes == sorted(as_bytes)
    for b in range(1 << tree.bits):
        assert all(cc.bucket_of(t.tobytes(), tree.bits) == b for t in tree.bucket_tags(b))
    assert tree.offsets[-1] == 3000
    # A receipt from stored parts: the members in bucket order and the levels,
    # recomputing one bucket's tags from its members' secrets.
    for i in (0, 1234, 2999):
        tag = tags[i].tobytes()
        b = cc.bucket_of(tag, tree.bits)
        members = secrets[tree.order[tree.offsets[b]:tree.offsets[b + 1]]]
        assert cc.bucket_proof(b, cc.member_tags(members, CONTEXT), tree.levels) == tree.proof(tag)


def test_tags_that_share_their_first_half_are_still_ordered_and_repeats_refused():
    rng = np.random.default_rng(5)
    tags = rng.integers(0, 256, size=(500, 16), dtype=np.uint8)
    tags[100:110, :8] = tags[0, :8]  # a run of ties in the high half, low halves differ
    tags[200:203, :12] = tags[1, :12]
    tree = cc.build(tags)
    assert [row.tobytes() for row in tree.tags] == sorted(row.tobytes() for row in tags)
    assert np.array_equal(tags[tree.order], tree.tags)
    tags[300] = tags[105]
    with pytest.raises(ValueError, match="same tag"):
        cc.build(tags)


def test_empty_and_single_member_cohorts():
    empty = cc.build(np.empty((0, 16), dtype=np.uint8))
    outsider = os.urandom(16)
    assert cc.verify(empty.proof(outsider), outsider, 0, empty.root) is False
    (secret,) = random_secrets(1, 3)
    tag = cc.member_tag(secret.tobytes(), CONTEXT)
    one = cc.build(cc.member_tags(secret.reshape(1, 16), CONTEXT))
    assert one.proof(tag) == cc.CohortProof(bucket=0, tags=[tag.hex()], path=[])
    assert cc.verify(one.proof(tag), tag, 1, one.root) is True


def test_secrets_derive_per_patient_and_commit_by_hash():
    key = bytes(range(32))
    stems = np.array([943476591, 123456789, 943476591], dtype=np.uint32)
    secrets = cc.derive_secrets(key, stems)
    assert secrets.shape == (3, 16)
    assert np.array_equal(secrets[0], secrets[2]) and not np.array_equal(secrets[0], secrets[1])
    assert not np.array_equal(cc.derive_secrets(bytes(32), stems)[0], secrets[0])
    assert cc.secret_hash(secrets[0].tobytes()) != cc.secret_hash(secrets[1].tobytes())
    with pytest.raises(ValueError):
        cc.secret_hash(b"short")
    with pytest.raises(ValueError):
        cc.derive_secrets(b"short", stems)


def test_a_commitment_not_in_canonical_form_is_refused():
    """Ascending, unique tags make the tree a function of the member set, so an
    auditor holding the tags can recompute the very root: a bucket built any
    other way is refused even when its hashes add up."""
    low, high = sorted([os.urandom(16), os.urandom(16)])
    for bucket in ([high, low], [low, low]):
        root = hashlib.sha256(b"\x00" + b"".join(bucket)).digest()
        proof = cc.CohortProof(bucket=0, tags=[t.hex() for t in bucket], path=[])
        with pytest.raises(ProofError, match="strictly ascending"):
            cc.verify(proof, low, 2, root)


@pytest.mark.parametrize("tags, path", [(["zz" * 16], []), (["00" * 15], []), ([], ["00" * 31])])
def test_a_proof_built_by_hand_with_bad_values_is_a_proof_error(tags, path):
    with pytest.raises(ProofError):
        cc.verify(cc.CohortProof(bucket=0, tags=tags, path=path), bytes(16), 1, bytes(32))
