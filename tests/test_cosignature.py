"""C2SP tlog-cosignature and tlog-witness bodies, against the specs' own
examples and a verifier written from the spec text."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from contracts import cosignature, note
from contracts.note import NoteError

# c2sp.org/tlog-cosignature, the example at the top of the spec.
SPEC_NOTE = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)
# ... and its "Ed25519 signed message" section.
SPEC_MESSAGE = (
    "cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)
# c2sp.org/tlog-witness, the add-checkpoint example request and response bodies.
SPEC_REQUEST = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "— example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=\n"
)
SPEC_RESPONSE = (
    "— witness.example/w1 CMp+6LWBU0anHGH5aNDTJkH/gj79sG+T6+iP2ThYN5krrDJbR1HDnucjL39QsZTSvVjyQLrdk3DXDqI5G2HgLatVs0pWh6Up69HVOw==\n"
    "— witness.example/w1 I7rEps0pvK2UqkS2gSpVUDhrhVtQV9lgF6pRrWAvjJHjyWpW7VcE3SiOlVlbQNt64vWhO+DlkL0+UfzuOBMh9ChdMkP1vi/lCAsmlw==\n"
    "— witness.example/w2 AWui8Sk55XjYLOijihBjhqEH6nS1ndDymE0a+6idX7pLcnoB+dhnz0854aLZgrrKbYKA7nC3HNJhm/kWl7oJlqU3rXXvpysAdyP3wQ==\n"
)
# A cosigner vkey in use (from transparency-dev/formats' note tests): type 0x04, its key ID.
REAL_COSIGNER_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"


def test_the_spec_example_cosignature_frames_a_timestamped_signature():
    text, signatures = note.split(SPEC_NOTE)
    witness = signatures[1]
    assert (witness.name, witness.id.hex(), len(witness.signature)) == ("witness.example.com/w1", "8d66cf3f", 72)
    (timestamp,) = struct.unpack(">Q", witness.signature[:8])
    assert timestamp == 1679315147
    assert cosignature.message(text, timestamp).decode() == SPEC_MESSAGE


def test_the_spec_request_and_response_bodies_parse_and_round_trip():
    request = cosignature.parse_add_checkpoint(SPEC_REQUEST.encode())
    assert request.old_size == 20852014 and len(request.proof) == 4
    assert request.proof[0] == base64.b64decode("PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=")
    assert note.parse_checkpoint(note.split(request.checkpoint)[0]).size == 20852163
    assert request.body() == SPEC_REQUEST.encode()
    # The response is signature lines: appended to the checkpoint they make a note.
    _, lines = note.split(request.checkpoint + SPEC_RESPONSE)
    assert [(s.name, len(s.signature)) for s in lines[2:]] == [("witness.example/w1", 72)] * 2 + [("witness.example/w2", 72)]


def test_a_real_cosigner_vkey_has_the_type_4_key_id():
    v = cosignature.parse_vkey(REAL_COSIGNER_VKEY)
    assert v.id.hex() == "da77ade7" and v.vkey == REAL_COSIGNER_VKEY
    with pytest.raises(NoteError, match="0x04"):
        cosignature.parse_vkey(note.Signer.generate("log.example").verifier.vkey)  # a 0x01 log key
    with pytest.raises(NoteError, match="key ID"):
        cosignature.parse_vkey(REAL_COSIGNER_VKEY.replace("da77ade7", "da77ade8"))


def independent_verify(vkey: str, text: str, line: str) -> int:
    """From the spec text alone: key ID with 0x04, 8-byte big-endian time, Ed25519 over the message."""
    name, hex_id, b64 = vkey.split("+", 2)
    public = base64.b64decode(b64)[1:]
    assert hashlib.sha256(name.encode() + b"\n\x04" + public).digest()[:4].hex() == hex_id
    prefix = f"— {name} "
    assert line.startswith(prefix) and line.endswith("\n")
    blob = base64.b64decode(line[len(prefix):-1])
    assert blob[:4].hex() == hex_id and len(blob) == 76
    timestamp = int.from_bytes(blob[4:12], "big")
    signed = b"cosignature/v1\n" + b"time " + str(timestamp).encode() + b"\n" + text.encode()
    Ed25519PublicKey.from_public_bytes(public).verify(blob[12:], signed)
    return timestamp


def test_cosignatures_verify_with_code_written_from_the_spec():
    log = note.Signer.generate("log.example/consent")
    signed = note.sign("log.example/consent\n42\n" + base64.b64encode(bytes(32)).decode() + "\n", [log])
    text = note.split(signed)[0]
    witness = cosignature.Cosigner.from_signer(note.Signer.generate("witness.example/nhs-guardian"))
    line = witness.cosign(text, 1_767_000_000)
    assert independent_verify(witness.verifier.vkey, text, line) == 1_767_000_000

    cosigned = signed + line
    assert cosignature.cosignatures(cosigned, [witness.verifier]) == {witness.verifier.vkey: 1_767_000_000}
    # The log's own key ignores the witness line, and the witness key ignores the log's.
    assert note.open_note(cosigned, [log.verifier])[1] == [log.verifier]
    assert cosignature.cosignatures(signed, [witness.verifier]) == {}
    # A cosignature moved to another checkpoint, or with its time changed, fails.
    other = signed.replace("\n42\n", "\n43\n")
    with pytest.raises(NoteError, match="does not verify"):
        cosignature.cosignatures(other.split("\n\n")[0] + "\n\n" + line, [witness.verifier])
    blob = bytearray(base64.b64decode(line.split(" ")[-1]))
    blob[11] ^= 1
    retimed = line.rsplit(" ", 1)[0] + " " + base64.b64encode(bytes(blob)).decode() + "\n"
    with pytest.raises(NoteError, match="does not verify"):
        cosignature.cosignatures(signed + retimed, [witness.verifier])


def test_a_plain_note_signature_by_a_known_cosigner_is_refused():
    signer = note.Signer.generate("witness.example/w9")
    cosigner = cosignature.Cosigner.from_signer(signer)
    text = "log\n1\n" + base64.b64encode(bytes(32)).decode() + "\n"
    blob = cosigner.verifier.id + signer.private.sign(text.encode())  # 64 bytes, no timestamp
    line = f"— {signer.name} {base64.b64encode(blob).decode()}\n"
    with pytest.raises(NoteError, match="not a cosignature/v1"):
        cosignature.cosignatures(text + "\n" + line, [cosigner.verifier])


@pytest.mark.parametrize("body", [
    b"", b"old 1\n", b"old 01\n\n", b"old -1\n\n", b"ol 1\n\n", b"old 1\nnot base64!\n\n",
    b"old 1\n" + base64.b64encode(bytes(31)) + b"\n\n", b"old 1\n\nnot a note",
    b"old 1\n" + (base64.b64encode(bytes(32)) + b"\n") * 64 + b"\n", b"\xff\xfe",
])
def test_malformed_requests_are_refused(body: bytes):
    with pytest.raises(NoteError):
        cosignature.parse_add_checkpoint(body)


def test_the_conflict_body_carries_the_size():
    assert cosignature.size_body(20852014) == b"20852014\n"
    assert cosignature.parse_size_body(b"20852014\n") == 20852014
    for bad in (b"12", b"012\n", b"x\n", b""):
        with pytest.raises(NoteError):
            cosignature.parse_size_body(bad)
