"""Checking a receipt a patient holds, with nothing but the log's public key.

The same steps the browser runs in /static/receipt-check.js (for readers
without JavaScript, or whose browser lacks Ed25519): the entry's bytes hash
to its leaf, the inclusion proof leads from that leaf to a root, and a
checkpoint signed by the log's key commits to that root at that size."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

from contracts import bodies, merkle, note
from contracts import cohort_commitment as cc


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def check_receipt(text: str, verifiers: list[note.Verifier], origin: str) -> list[Check]:
    """Every check on a pasted receipt (GET /v1/patients/{nhs}/receipts/{position}), in order;
    the first that fails ends the list (later checks would only repeat it)."""
    checks: list[Check] = []
    try:
        receipt = msgspec.json.decode(text.encode(), type=bodies.ReceiptProof)
    except msgspec.DecodeError as exc:
        return [Check("receipt", False, f"this is not a receipt as the ledger gives them: {exc}")]
    leaf = hashlib.sha256(b"\x00" + receipt.entry.encode()).digest()
    if leaf.hex() != receipt.leaf_hash.lower():
        return [Check("leaf", False, "the entry's bytes do not hash to the receipt's leaf hash: the entry was changed")]
    checks.append(Check("leaf", True, f"the entry hashes to leaf {leaf.hex()[:16]}…"))
    proof = receipt.proof
    try:
        root = merkle.root_from_inclusion(proof.leaf_index, proof.tree_size, leaf,
                                          [bytes.fromhex(h) for h in proof.hashes])
    except (ValueError, merkle.ProofError) as exc:
        return [*checks, Check("proof", False, f"the inclusion proof is malformed: {exc}")]
    checks.append(Check("proof", True, f"the proof leads from entry {proof.leaf_index + 1} to a root of a "
                                      f"{proof.tree_size:,}-entry log"))
    try:
        checkpoint = note.open_checkpoint(receipt.checkpoint, verifiers, origin)
    except note.NoteError as exc:
        return [*checks, Check("signature", False, f"the checkpoint is not signed by this log's key: {exc}")]
    checks.append(Check("signature", True, f"the checkpoint is signed by {origin}'s key"))
    if checkpoint.size != proof.tree_size or checkpoint.root != root:
        return [*checks, Check("root", False, "the signed checkpoint commits to another log than the proof leads to")]
    checks.append(Check("root", True, f"the signed checkpoint commits to that root at size {checkpoint.size:,}"))
    if receipt.cohort is not None:
        checks += _cohort_checks(receipt)
    return checks


def _cohort_checks(receipt: bodies.ReceiptProof) -> list[Check]:
    """The patient's proof against the use's cohort commitment, as the entry itself states it (§8)."""
    cohort = receipt.cohort
    assert cohort is not None
    payload = msgspec.json.decode(receipt.entry.encode()).get("payload", {})
    removal = "removed_commitment" in payload
    stated = payload.get("cohort_commitment") or payload.get("removed_commitment") or {}
    secret = bytes.fromhex(cohort.secret)
    if cc.secret_hash(secret) != cohort.secret_hash:
        return [Check("secret", False, "the transparency secret does not match its committed hash")]
    tag = cc.member_tag(secret, cohort.context)
    try:
        member = cc.verify(cohort.proof, tag, int(stated.get("size", -1)), bytes.fromhex(stated.get("root", "")))
    except (ValueError, merkle.ProofError) as exc:
        return [Check("cohort", False, f"the cohort proof does not check against the entry's commitment: {exc}")]
    what = "this filter call removed" if removal else "this use committed to"
    checks = [Check("cohort", True, f"you {'were' if member else 'were not'} among the {stated['size']:,} patients "
                                    f"{what}")]
    if not cohort.provable:
        checks.append(Check("secret", False, f"your transparency secret was committed (entry {cohort.secret_position})"
                                              " only after this use, so this proof cannot be relied on; uses "
                                              "after it can"))
    return checks
