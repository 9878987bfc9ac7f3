"""Recently verified bearer tokens.

A backend (the patient app's, an SDE's) sends the same token on every request
until it expires; checking its Ed25519 signature each time was the largest
single CPU cost of a write after the database round trips (bench/RESULTS.md).
Only tokens that verified are remembered, keyed by the exact token text, and
only while the verifier still holds the same key set (a JWKS refresh that
drops a key ends every cached answer) and until the earlier of the token's
`exp` and a short maximum age, so a cached answer is never one the verifier
would not give.
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable

from joserfc.jwk import KeySet

from service.app.caller import Caller
from service.auth.tokens import Verifier

MAX_AGE_SECONDS = 300.0


def _expiry(token: str) -> float | None:
    """The `exp` claim of a token whose signature has already been verified."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    except (IndexError, ValueError, AttributeError):
        return None


class VerifiedTokens:
    def __init__(self, verifier: Verifier, *, size: int = 4096, max_age: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.time):
        self.verifier = verifier
        self._size = size
        self._max_age = max_age
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Caller, float, KeySet]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Caller:
        now = self._clock()
        if authorization:
            hit = self._cache.get(authorization)
            if hit is not None:
                if now < hit[1] and hit[2] is self.verifier.keys:
                    self._cache.move_to_end(authorization)
                    return hit[0]
                del self._cache[authorization]
        # Taken before verifying: if verifying refreshes the keys, the entry
        # is tagged with the older set and simply misses next time.
        keys = self.verifier.keys
        caller = await self.verifier.authenticate(authorization)  # raises when refused: never cached
        assert authorization is not None
        exp = _expiry(authorization.partition(" ")[2].strip())
        if exp is not None:
            self._cache[authorization] = (caller, min(exp, now + self._max_age), keys)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return caller

    def __len__(self) -> int:
        return len(self._cache)
