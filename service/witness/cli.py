"""``consent-ledger witness serve | keys generate``: the witness's command line.

    witness serve --key FILE --log ORIGIN:VKEY [--log ...] [--state DIR] [--host H] [--port P]
    witness keys generate --name NAME --out FILE
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from contracts import cosignature, note
from contracts.note import NoteError
from service import config
from service.console import failures
from service.console.failures import CommandError
from service.runtime import logs
from service.store.checkpoints import write_key
from service.witness.server import create_app
from service.witness.state import WitnessState

log = structlog.get_logger("consent_ledger.witness")


def parse_log(text: str) -> tuple[str, note.Verifier]:
    """ORIGIN:VKEY.  Origins and key names may hold ':' themselves; only one
    split leaves a vkey whose key ID matches its name and key."""
    for i, c in enumerate(text):
        if c == ":" and i:
            try:
                return text[:i], note.parse_vkey(text[i + 1:])
            except NoteError:
                continue
    raise argparse.ArgumentTypeError(f"{text[:80]!r} is not ORIGIN:VKEY with a valid Ed25519 log vkey")


def _serve(args: argparse.Namespace) -> None:
    cfg = config.load()  # only the log settings apply to a witness
    logs.configure(cfg.log_level, cfg.log_format)
    try:
        cosigner = cosignature.Cosigner.from_signer(note.parse_signer(Path(args.key).read_text()))
    except OSError as exc:
        raise CommandError(f"witness: cannot read the witness key {args.key} ({exc.strerror}): give the file "
                           "`consent-ledger witness keys generate` wrote") from None
    except NoteError as exc:
        raise CommandError(f"witness: {args.key} is not a witness key ({exc})") from None
    trusted: dict[str, list[note.Verifier]] = {}
    for origin, verifier in args.log:
        trusted.setdefault(origin, []).append(verifier)
    state = WitnessState(Path(args.state))
    log.info("witness serving", vkey=cosigner.verifier.vkey, logs=sorted(trusted), state=str(state.path),
             host=args.host, port=args.port)
    try:
        web.run_app(create_app(cosigner, trusted, state), host=args.host, port=args.port, access_log=None, print=None)
    finally:
        state.close()


def _keys_generate(args: argparse.Namespace) -> None:
    try:
        signer = note.Signer.generate(args.name)
        write_key(Path(args.out), signer)
    except NoteError as exc:
        raise CommandError(f"witness: {exc}") from None
    except FileExistsError:
        raise CommandError(f"witness: {args.out} exists: refusing to overwrite a witness key") from None
    print(f"# witness key written to {args.out}; publish this cosigner key:", file=sys.stderr)
    print(cosignature.Cosigner.from_signer(signer).verifier.vkey)


def parser() -> argparse.ArgumentParser:
    p = failures.OneLineParser(top=True, prog="consent-ledger witness", epilog=failures.EXIT_STATUSES,
                               description="A C2SP tlog-witness: cosigns checkpoints of the logs it is given.",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=failures.OneLineParser)
    serve = sub.add_parser("serve", help="cosign checkpoints of the given logs (C2SP tlog-witness)")
    serve.add_argument("--key", required=True, help="the witness's private key file (from `witness keys generate`)")
    serve.add_argument("--log", required=True, action="append", type=parse_log, metavar="ORIGIN:VKEY",
                       help="a log to witness: its checkpoint origin and a verifier key; repeat for more"
                            " logs, or for more keys of one log")
    serve.add_argument("--state", default=".consent-ledger-witness",
                       help="directory of the witness's state (default ./.consent-ledger-witness)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7380)
    serve.set_defaults(run=_serve)
    keys = sub.add_parser("keys", help="witness keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="write a new Ed25519 witness key; print its cosigner vkey")
    generate.add_argument("--name", required=True, help="the witness's name, a schema-less URL (e.g. witness.example.org/ndg)")
    generate.add_argument("--out", required=True, help="private key file to create (mode 0600)")
    generate.set_defaults(run=_keys_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return failures.run(lambda: args.run(args), debug=args.debug)
