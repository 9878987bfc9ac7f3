"""Bearer-token authentication (JWT, verified with joserfc) and role rules.

Tokens are EdDSA (Ed25519) or ES256 JWTs whose keys come from a JWKS file or
URL.  On the embedded development default with no JWKS configured, a local
Ed25519 key is generated in the data directory and `consent-ledger token
issue` signs development tokens with it.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey

from contracts.api import ROLES
from contracts.nhs_number import InvalidNhsNumber, NhsNumber

from .commands import Caller
from .config import Config

ALGORITHMS = ("EdDSA", "Ed25519", "ES256")
LEEWAY_SECONDS = 60
DEV_KEY_FILE = "dev-signing-key.jwk.json"

# "EdDSA" is the name most issuers still use; RFC 9864 merely prefers "Ed25519".
warnings.filterwarnings("ignore", message="EdDSA is deprecated")


class Unauthenticated(Exception):
    """No credentials, or credentials that do not verify (HTTP 401)."""


class Forbidden(Exception):
    """Valid credentials without the right to this request (HTTP 403)."""


@dataclass(frozen=True)
class Verifier:
    keys: KeySet
    issuer: str
    audience: str

    def caller(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthenticated("this endpoint needs `Authorization: Bearer <token>`")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("use the Bearer scheme: `Authorization: Bearer <token>`")
        try:
            decoded = jwt.decode(token.strip(), self.keys, algorithms=list(ALGORITHMS))
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                sub={"essential": True},
                exp={"essential": True},
            ).validate(decoded.claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise Unauthenticated(f"the token was refused: {_reason(exc)}") from None
        return _caller_from_claims(decoded.claims)


def _reason(exc: Exception) -> str:
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return text[:200]


def _caller_from_claims(claims: dict[str, Any]) -> Caller:
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("the token's `roles` claim must be a list of strings")
    org = claims.get("org")
    if org is not None and not isinstance(org, str):
        raise Unauthenticated("the token's `org` claim must be a string")
    nhs = claims.get("nhs_number")
    if nhs is not None:
        try:
            nhs = NhsNumber(nhs)
        except (InvalidNhsNumber, TypeError):
            raise Unauthenticated("the token's `nhs_number` claim is not a valid NHS number") from None
    return Caller(subject=str(claims["sub"]), roles=frozenset(roles) & frozenset(ROLES), org=org, nhs_number=nhs)


def authorise(caller: Caller, allowed: frozenset[str], nhs: str | None = None) -> None:
    """The role rule for an operation, plus the patient rule for patient paths.

    A patient-app token with an `nhs_number` claim acts for that patient only;
    one without it is a trusted backend acting for the patient in the path.
    """
    if not caller.roles & allowed:
        raise Forbidden(f"this needs one of the roles: {', '.join(sorted(allowed))}")
    if nhs is not None and caller.nhs_number is not None and caller.nhs_number != nhs:
        raise Forbidden("this token may only act for its own patient")


def dev_key_path(config: Config) -> Path:
    return config.data_dir / DEV_KEY_FILE


def load_or_create_dev_key(config: Config) -> OKPKey:
    path = dev_key_path(config)
    if path.exists():
        return OKPKey.import_key(json.loads(path.read_text()))
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "dev", "use": "sig", "alg": "EdDSA"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(key.as_dict(private=True)))
    return key


def load_keys(source: str) -> KeySet:
    """A JWKS from a file path or an http(s) URL."""
    if source.startswith(("https://", "http://")):
        with urlopen(source, timeout=10) as response:  # noqa: S310 - scheme checked above
            data = json.load(response)
    else:
        data = json.loads(Path(source).read_text())
    keys = KeySet.import_key_set(data)
    private = [k for k in keys if k.is_private]
    if private:
        raise ValueError("the JWKS holds private keys: publish only public keys to the service")
    return keys


def verifier(config: Config) -> tuple[Verifier, bool]:
    """The token verifier, and whether it uses the generated development key."""
    if config.jwks:
        return Verifier(load_keys(config.jwks), config.jwt_issuer, config.jwt_audience), False
    if config.production:
        raise RuntimeError("CONSENT_LEDGER_JWKS must be set when CONSENT_LEDGER_ENV=production")
    key = load_or_create_dev_key(config)
    public = KeySet.import_key_set({"keys": [key.as_dict(private=False)]})
    return Verifier(public, config.jwt_issuer, config.jwt_audience), True


def issue_token(
    key: OKPKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: list[str],
    org: str | None = None,
    nhs_number: str | None = None,
    lifetime: int = 3600,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer, "aud": audience, "sub": subject, "roles": roles,
        "iat": now, "nbf": now, "exp": now + lifetime,
    }
    if org:
        claims["org"] = org
    if nhs_number:
        claims["nhs_number"] = NhsNumber(nhs_number)
    kid = key.kid or "dev"
    return jwt.encode({"alg": "EdDSA", "kid": kid}, claims, key, algorithms=["EdDSA"])
