"""The Merkle tree and proofs against a reference written from RFC 9162 text,
and the signed note against a parser written from the C2SP spec text."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import merkle, note


# --- an independent reference: the recursive definitions of RFC 9162 §2.1 --------------


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return H(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def data(n: int) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(n)]


def lookup_for(entries: list[bytes]):
    leaves = [H(b"\x00" + e) for e in entries]

    def lookup(level: int, index: int) -> bytes:
        span = leaves[index << level:(index + 1) << level]
        assert len(span) == 1 << level, "asked for a subtree beyond the tree"
        return merkle.root_from_leaves(span)

    return leaves, lookup


# --- RFC 6962 / CT test vectors (the 8 leaves used by certificate-transparency-go) -------

CT_LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_rfc6962_vector_roots():
    assert merkle.root_from_leaves([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for n in range(1, 9):
        leaves = [H(b"\x00" + e) for e in CT_LEAVES[:n]]
        assert merkle.root_from_leaves(leaves).hex() == CT_ROOTS[n - 1]
        assert ref_mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]


# --- properties ------------------------------------------------------------------------


sizes_and_index = st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1)))
sizes_pair = st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n)))


@settings(max_examples=150, deadline=None)
@given(sizes_and_index)
def test_inclusion_matches_reference_and_verifies(args):
    n, m = args
    entries = data(n)
    leaves, lookup = lookup_for(entries)
    proof = merkle.inclusion_proof(m, n, lookup)
    assert proof == ref_path(m, entries)
    root = ref_mth(entries)
    merkle.verify_inclusion(m, n, leaves[m], proof, root)


@settings(max_examples=150, deadline=None)
@given(sizes_pair)
def test_consistency_matches_reference_and_verifies(args):
    m, n = args
    entries = data(n)
    _, lookup = lookup_for(entries)
    proof = merkle.consistency_proof(m, n, lookup)
    assert proof == (ref_proof(m, entries) if m < n else [])
    merkle.verify_consistency(m, n, ref_mth(entries[:m]), ref_mth(entries), proof)


def flip(b: bytes, bit: int) -> bytes:
    i = bit // 8 % len(b)
    return b[:i] + bytes([b[i] ^ (1 << bit % 8)]) + b[i + 1:]


@settings(max_examples=150, deadline=None)
@given(sizes_and_index, st.integers(0, 10_000), st.sampled_from(["proof", "leaf", "root", "size", "index"]))
def test_any_flipped_inclusion_input_fails(args, bit, what):
    n, m = args
    entries = data(n)
    leaves, lookup = lookup_for(entries)
    proof, leaf, root, size, index = merkle.inclusion_proof(m, n, lookup), leaves[m], ref_mth(entries), n, m
    if what == "proof":
        if not proof:
            return
        j = bit % len(proof)
        proof = proof[:j] + [flip(proof[j], bit)] + proof[j + 1:]
    elif what == "leaf":
        leaf = flip(leaf, bit)
    elif what == "root":
        root = flip(root, bit)
    elif what == "size":
        size ^= 1 << (bit % 10)
    else:
        index ^= 1 << (bit % 10)
    if what in ("size", "index") and same_shape((index, size), (m, n)):
        return  # RFC 9162 binds the path shape, not the exact size: the checkpoint binds the size
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(index, size, leaf, proof, root)


def consistency_shape(old: int, new: int):
    return [(start < old, end <= old) for start, end in merkle.consistency_ranges(old, new)]


def same_shape(a: tuple[int, int], b: tuple[int, int]) -> bool:
    def shape(index: int, size: int):
        if not 0 <= index < size:
            return None
        return [start > index for start, _ in merkle.inclusion_ranges(index, size)]
    return shape(*a) == shape(*b)


@settings(max_examples=150, deadline=None)
@given(sizes_pair, st.integers(0, 10_000), st.sampled_from(["proof", "old_root", "new_root", "old", "new"]))
def test_any_flipped_consistency_input_fails(args, bit, what):
    m, n = args
    if m == n:
        n += 1
    entries = data(n)
    _, lookup = lookup_for(entries)
    proof = merkle.consistency_proof(m, n, lookup)
    old_root, new_root, old, new = ref_mth(entries[:m]), ref_mth(entries), m, n
    if what == "proof":
        j = bit % len(proof)
        proof = proof[:j] + [flip(proof[j], bit)] + proof[j + 1:]
    elif what == "old_root":
        old_root = flip(old_root, bit)
    elif what == "new_root":
        new_root = flip(new_root, bit)
    elif what == "old":
        old ^= 1 << (bit % 10)
    else:
        new ^= 1 << (bit % 10)
    if what in ("old", "new") and (old <= 0 or old > new or consistency_shape(old, new) == consistency_shape(m, n)):
        if old <= 0 or old > new:
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(max(old, 1), new, old_root, new_root, proof) if old > new else \
                    merkle.consistency_ranges(old, new)
        return  # same path shape: RFC 9162 binds the sizes only through the signed roots
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(old, new, old_root, new_root, proof)


def test_tile_paths_follow_tlog_tiles():
    assert merkle.tile_index_path(1234067) == "x001/x234/067"
    assert merkle.tile_index_path(5) == "005"
    assert merkle.tile_path(0, 1234067, 17) == "tile/0/x001/x234/067.p/17"
    assert merkle.tile_path("entries", 1000) == "tile/entries/x001/000"
    assert merkle.parse_tile_index("x001/x234/067") == 1234067
    for bad in ("x000/005", "5", "0005", "x1/005", "001/005"):
        with pytest.raises(ValueError):
            merkle.parse_tile_index(bad)
    # The spec's worked example: a tree of 70,000 leaves.
    tiles = merkle.tiles_for(70_000)
    assert sum(1 for t in tiles if t[0] == 0 and t[2] == 256) == 273
    assert (0, 273, 112) in tiles and (1, 0, 256) in tiles and (1, 1, 17) in tiles and (2, 0, 1) in tiles
    assert merkle.tiles_for(256) == [(0, 0, 256), (1, 0, 1)]


# --- signed notes, checked by a parser written from the C2SP text --------------------------


def independent_open(note_text: str, vkey: str) -> list[str]:
    """signed-note: text, blank line, lines "— name base64(keyid4||sig)";
    vkey: name+hex(keyid)+base64(0x01||pubkey); key ID = SHA-256(name||0x0A||0x01||pub)[:4]."""
    name, hexid, b64 = vkey.split("+", 2)
    raw = base64.b64decode(b64)
    assert raw[0] == 1
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == hexid
    pub = Ed25519PublicKey.from_public_bytes(raw[1:])
    body, _, sigs = note_text.rpartition("\n\n")
    text = (body + "\n").encode()
    ok = False
    for line in sigs.strip("\n").split("\n"):
        assert line.startswith("\u2014 ")
        n, b = line[2:].split(" ")
        sig = base64.b64decode(b)
        if n == name and sig[:4].hex() == hexid:
            pub.verify(sig[4:], text)
            ok = True
    assert ok
    return text.decode().split("\n")[:-1]


def test_checkpoint_note_parses_with_independent_parser():
    signer, other = note.Signer.generate("consent-ledger.example/log"), note.Signer.generate("witness.example/w")
    cp = note.Checkpoint("consent-ledger.example/log", 8, bytes.fromhex(CT_ROOTS[7]))
    signed = note.sign(cp.body(), [signer, other])
    lines = independent_open(signed, signer.verifier.vkey)
    assert lines == ["consent-ledger.example/log", "8", base64.b64encode(bytes.fromhex(CT_ROOTS[7])).decode()]
    assert note.open_checkpoint(signed, [signer.verifier]) == cp
    assert note.open_checkpoint(signed, [other.verifier]) == cp
    assert note.parse_vkey(signer.verifier.vkey) == signer.verifier
    assert note.parse_signer(signer.private_text).verifier == signer.verifier


def test_tampered_or_unknown_notes_are_refused():
    signer = note.Signer.generate("consent-ledger.example/log")
    stranger = note.Signer.generate("consent-ledger.example/log")
    signed = note.sign(note.Checkpoint("consent-ledger.example/log", 9, bytes(32)).body(), [signer])
    with pytest.raises(note.NoteError):
        note.open_checkpoint(signed.replace("\n9\n", "\n8\n"), [signer.verifier])
    with pytest.raises(note.NoteError, match="no signature by a known key"):
        note.open_checkpoint(signed, [stranger.verifier])
    with pytest.raises(note.NoteError):
        note.open_checkpoint(signed, [signer.verifier], origin="other.example/log")


def test_go_sumdb_note_vector():
    """The example key and note from golang.org/x/mod/sumdb/note documentation."""
    vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    text = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
    signed = text + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
    got, signers = note.open_note(signed, [note.parse_vkey(vkey)])
    assert got == text and signers[0].name == "PeterNeumann"
