"""The verified-token cache answers exactly as the verifier would: only for
tokens that verified, only until they expire or the keys change, never for
a look-alike."""

from __future__ import annotations

import time

import pytest

from joserfc.jwk import KeySet

from service.auth.tokens import Unauthenticated, Verifier
from service.auth.token_cache import VerifiedTokens


class CountingVerifier(Verifier):
    calls = 0

    def caller(self, authorization):
        type(self).calls += 1
        return super().caller(authorization)


@pytest.fixture
def counting(verifier: Verifier) -> CountingVerifier:
    CountingVerifier.calls = 0
    return CountingVerifier(verifier.keys, verifier.issuer, verifier.audience)


async def test_a_new_key_set_ends_every_cached_answer(counting, make_token):
    tokens = VerifiedTokens(counting)
    header = f"Bearer {make_token('patient-app')}"
    await tokens.authenticate(header)
    # What a JWKS refresh does: a new key set that no longer holds the signing key.
    counting.keys = KeySet([])
    with pytest.raises(Unauthenticated):
        await tokens.authenticate(header)
    assert counting.calls == 2


async def test_a_repeated_token_is_verified_once(counting, make_token):
    tokens = VerifiedTokens(counting)
    header = f"Bearer {make_token('patient-app')}"
    first = await tokens.authenticate(header)
    assert await tokens.authenticate(header) == first and first.roles == frozenset({"patient-app"})
    assert counting.calls == 1


async def test_refusals_are_never_cached_and_look_alikes_are_checked(counting, make_token):
    tokens = VerifiedTokens(counting)
    good = make_token("patient-app")
    await tokens.authenticate(f"Bearer {good}")
    head, payload, signature = good.split(".")
    forged = f"{head}.{payload}.{'A' * len(signature)}"
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await tokens.authenticate(f"Bearer {forged}")
        with pytest.raises(Unauthenticated):
            await tokens.authenticate(None)
    assert counting.calls == 1 + 4 and len(tokens) == 1


async def test_an_expired_entry_is_verified_again(counting, make_token):
    now = [time.time()]
    tokens = VerifiedTokens(counting, clock=lambda: now[0])
    header = f"Bearer {make_token('patient-app', exp=int(now[0]) + 30)}"
    await tokens.authenticate(header)
    now[0] += 29
    await tokens.authenticate(header)
    assert counting.calls == 1
    now[0] += 2  # past exp: the cache no longer answers; the verifier decides (still within its leeway)
    await tokens.authenticate(header)
    assert counting.calls == 2


async def test_entries_age_out_and_the_cache_stays_bounded(counting, make_token):
    now = [time.time()]
    tokens = VerifiedTokens(counting, size=2, max_age=10, clock=lambda: now[0])
    headers = [f"Bearer {make_token('patient-app', subject=f's{i}')}" for i in range(3)]
    for h in headers:
        await tokens.authenticate(h)
    assert len(tokens) == 2
    await tokens.authenticate(headers[2])
    assert counting.calls == 3
    now[0] += 11
    await tokens.authenticate(headers[2])
    assert counting.calls == 4
