"""Bearer-token authentication (JWT, verified with joserfc) and role rules.

Tokens are EdDSA (Ed25519) or ES256 JWTs whose keys come from a JWKS file or
URL.  On the embedded development default with no JWKS configured, a local
Ed25519 key is generated in the data directory and `consent-ledger token
issue` signs development tokens with it.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    DecodeError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
    MissingKeyError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet, OKPKey

from contracts.api import ROLES
from contracts.nhs_number import InvalidNhsNumber, NhsNumber
from contracts.values import Identifier, ShortText
from service.app.caller import Caller
from service.config import Config, ConfigError

ALGORITHMS = ("EdDSA", "Ed25519", "ES256")
LEEWAY_SECONDS = 60
DEV_KEY_FILE = "dev-signing-key.jwk.json"

# "EdDSA" is the name most issuers still use; RFC 9864 merely prefers "Ed25519".
warnings.filterwarnings("ignore", message="EdDSA is deprecated")

log = structlog.get_logger("consent_ledger.auth")


class Unauthenticated(Exception):
    """No credentials, or credentials that do not verify (HTTP 401).

    ``invalid_token`` distinguishes a presented-but-refused token (RFC 6750
    ``error="invalid_token"``) from a request that carried none.
    """

    def __init__(self, detail: str, *, invalid_token: bool = True):
        super().__init__(detail)
        self.invalid_token = invalid_token

    def challenge(self) -> str:
        if not self.invalid_token:
            return 'Bearer realm="consent-ledger"'
        # RFC 6750 3: the description is a quoted-string of visible ASCII without quotes or backslashes.
        description = "".join(c for c in str(self) if c.isascii() and c.isprintable() and c not in '"\\')
        return f'Bearer realm="consent-ledger", error="invalid_token", error_description="{description}"'


class Forbidden(Exception):
    """Valid credentials without the right to this request (HTTP 403)."""


class JwksUrl:
    """Keys published at an http(s) URL: fetched at start, refreshed every
    ``interval`` seconds, and on a token whose ``kid`` is unknown (key
    rotation) at most once per ``min_interval`` so that tokens with random
    kids cannot make the service hammer the issuer."""

    def __init__(self, url: str, *, interval: float = 300.0, min_interval: float = 30.0,
                 timeout: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.interval = interval
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0
        self._last_fetch: float | None = None
        self._lock = asyncio.Lock()

    async def fetch(self) -> KeySet:
        self.fetches += 1
        self._last_fetch = self.clock()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(self.url, headers={"Accept": "application/json"}) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
        return key_set(data)

    def may_fetch(self) -> bool:
        return self._last_fetch is None or self.clock() - self._last_fetch >= self.min_interval


@dataclass
class Verifier:
    keys: KeySet
    issuer: str
    audience: str
    source: JwksUrl | None = None
    # Longest accepted token lifetime (CONSENT_LEDGER_TOKEN_MAX_LIFETIME_SECONDS):
    # a stolen token must not stay good for years.
    max_lifetime: float = 86_400.0
    # Tokens are signed by the key generated in the data directory (`token issue`).
    development: bool = False

    def caller(self, authorization: str | None) -> Caller:
        token = _bearer(authorization)
        try:
            decoded = jwt.decode(token, self.keys, algorithms=list(ALGORITHMS))
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                sub={"essential": True},
                exp={"essential": True},
                # Checked whenever present; issuers that omit it are common.
                nbf={"essential": False},
            ).validate(decoded.claims)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            reason = self._reason(exc)
            log.info("token refused", reason=reason)
            raise Unauthenticated(f"the token was refused: {reason}") from None
        self._check_lifetime(decoded.claims)
        return _caller_from_claims(decoded.claims)

    def _reason(self, exc: Exception) -> str:
        """Why a token was refused, in plain words and with what to do about it."""
        match exc:
            case BadSignatureError() | MissingKeyError() | InvalidKeyIdError() if self.development:
                return ("its signature does not match this server's development key: issue the token with the "
                        "same data directory as the server (run `consent-ledger token issue` in the folder "
                        "where `consent-ledger serve` runs, or set CONSENT_LEDGER_DATA_DIR to its data directory)")
            case BadSignatureError() | MissingKeyError() | InvalidKeyIdError():
                return "its signature does not verify with any of this service's token keys (JWKS)"
            case ExpiredTokenError():
                return "it has expired: get a new one"
            case InvalidClaimError() if exc.claim in ("iss", "aud"):
                wanted = self.issuer if exc.claim == "iss" else self.audience
                return f"its `{exc.claim}` claim is not {wanted!r}, which this service requires"
            case InvalidClaimError() if exc.claim == "nbf":
                return "it is not valid yet (`nbf` is in the future): check the clocks"
            case MissingClaimError():
                return f"it has no `{exc.claim}` claim, which this service requires"
            case UnsupportedAlgorithmError():
                return f"it is signed with an algorithm this service refuses (allowed: {', '.join(ALGORITHMS)})"
            case DecodeError() | ValueError() | TypeError() | KeyError():
                return "it is not a well-formed JWT (three base64url parts separated by dots)"
        return _reason(exc)

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        exp, iat, now = claims["exp"], claims.get("iat"), time.time()
        if not isinstance(exp, (int, float)) or iat is not None and not isinstance(iat, (int, float)):
            raise Unauthenticated("the token's `exp` and `iat` must be numbers")
        longest = self.max_lifetime + LEEWAY_SECONDS
        if exp - now > longest or iat is not None and exp - iat > longest:
            raise Unauthenticated(f"the token lives longer than the {self.max_lifetime:g} s this service accepts: "
                                  "ask the issuer for a shorter-lived token")

    async def authenticate(self, authorization: str | None) -> Caller:
        """``caller``, after refreshing a URL-published JWKS if the token
        names a key we do not hold (the issuer may have rotated)."""
        if self.source is not None:
            kid = _kid(authorization)
            if kid is not None and not self._holds(kid) and self.source.may_fetch():
                await self.refresh()
        return self.caller(authorization)

    def _holds(self, kid: str) -> bool:
        return any(k.kid == kid for k in self.keys)

    async def refresh(self) -> None:
        assert self.source is not None
        async with self.source._lock:
            if not self.source.may_fetch():
                return
            try:
                self.keys = await self.source.fetch()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, JoseError) as exc:
                # Keep the keys we have: an issuer outage must not lock every caller out.
                log.warning("JWKS refresh failed; keeping the current keys", error=type(exc).__name__)
            else:
                log.info("JWKS refreshed", keys=len(self.keys.keys))

    async def start(self) -> None:
        """Fetch URL-published keys, failing if they cannot be had."""
        if self.source is not None:
            self.keys = await self.source.fetch()

    async def refresh_forever(self, beat: Callable[[], None]) -> None:
        """Keep URL-published keys fresh (run under the supervisor).  A failed
        fetch keeps the current keys and still counts as a beat: the issuer's
        outage is logged by ``refresh`` and must not take this service out of
        service while the keys it holds still verify tokens."""
        assert self.source is not None
        while True:
            await asyncio.sleep(self.source.interval)
            await self.refresh()
            beat()


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("this endpoint needs `Authorization: Bearer <token>`", invalid_token=False)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("use the Bearer scheme: `Authorization: Bearer <token>`", invalid_token=False)
    return token.strip()


def _kid(authorization: str | None) -> str | None:
    try:
        header = jws.extract_compact(_bearer(authorization).encode()).protected
    except (Unauthenticated, JoseError, ValueError, TypeError):
        return None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None


def _reason(exc: Exception) -> str:
    text = getattr(exc, "description", None) or str(exc).rstrip(": ") or "it does not verify"
    return text[:200]


class _Claims(msgspec.Struct):
    """The claims we use, held to the limits of the ledger fields they end up
    in (``recorded_by``, organisation codes): a token must not be able to
    write an entry that the ledger's own decoder would later reject."""

    sub: ShortText
    roles: list[str] = []
    org: Identifier | None = None
    nhs_number: str | None = None


def _caller_from_claims(claims: dict[str, Any]) -> Caller:
    try:
        c = msgspec.convert(claims, _Claims)
    except msgspec.ValidationError as exc:
        raise Unauthenticated(f"the token's claims are not acceptable: {exc}") from None
    nhs = None
    if c.nhs_number is not None:
        try:
            nhs = NhsNumber(c.nhs_number)
        except (InvalidNhsNumber, TypeError):
            raise Unauthenticated("the token's `nhs_number` claim is not a valid NHS number") from None
    return Caller(subject=c.sub, roles=frozenset(c.roles) & frozenset(ROLES), org=c.org, nhs_number=nhs)


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


def load_dev_key(config: Config) -> OKPKey | None:
    path = dev_key_path(config)
    return OKPKey.import_key(json.loads(path.read_text())) if path.exists() else None


def load_or_create_dev_key(config: Config) -> OKPKey:
    path = dev_key_path(config)
    key = load_dev_key(config)
    if key is not None:
        return key
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "dev", "use": "sig", "alg": "EdDSA"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(key.as_dict(private=True)))
    return key


def key_set(data: Any) -> KeySet:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS is a JSON object with a `keys` array")
    keys = KeySet.import_key_set(data)
    private = [k for k in keys if k.is_private]
    if private:
        raise ValueError("the JWKS holds private keys: publish only public keys to the service")
    return keys


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def load_keys(path: str) -> KeySet:
    """A JWKS from a file."""
    return key_set(json.loads(Path(path).read_text()))


def verifier(config: Config) -> tuple[Verifier, bool]:
    """The token verifier, and whether it uses the generated development key.

    A URL-published JWKS is fetched when the app starts (``Verifier.start``).
    """
    if config.jwks and is_url(config.jwks):
        source = JwksUrl(config.jwks, interval=config.jwks_refresh_seconds,
                         min_interval=config.jwks_min_refresh_seconds)
        return Verifier(KeySet([]), config.jwt_issuer, config.jwt_audience, source,
                        max_lifetime=config.token_max_lifetime_seconds), False
    if config.jwks:
        return Verifier(load_keys(config.jwks), config.jwt_issuer, config.jwt_audience,
                        max_lifetime=config.token_max_lifetime_seconds), False
    if config.production:
        raise ConfigError("CONSENT_LEDGER_JWKS must be set when CONSENT_LEDGER_ENV=production "
                          "(a JWKS file or URL with your token issuer's public keys)")
    key = load_or_create_dev_key(config)
    public = KeySet.import_key_set({"keys": [key.as_dict(private=False)]})
    return Verifier(public, config.jwt_issuer, config.jwt_audience,
                    max_lifetime=config.token_max_lifetime_seconds, development=True), True


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
