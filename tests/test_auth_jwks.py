"""Keys published at a JWKS URL: fetched at start, refreshed when a token
names an unknown key (rotation), and never more often than allowed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc.jwk import KeySet, OKPKey

from conftest import app_config, AUDIENCE, ISSUER
from service import config as config_module
from service.auth.tokens import JwksUrl, Unauthenticated, Verifier, verifier


class Issuer:
    """A token issuer's JWKS endpoint on loopback whose keys can be rotated."""

    def __init__(self) -> None:
        self.keys = [OKPKey.generate_key("Ed25519", parameters={"kid": "k1"})]
        self.requests = 0
        self.fail = False

    async def jwks(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.fail:
            return web.Response(status=500)
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def issuer() -> AsyncIterator[tuple[Issuer, str]]:
    state = Issuer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", state.jwks)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield state, str(server.make_url("/.well-known/jwks.json"))
    await server.close()


async def test_rotation_is_picked_up_on_an_unknown_kid_at_most_once_per_interval(issuer, make_token):
    state, url = issuer
    clock = Clock()
    v = Verifier(KeySet([]), ISSUER, AUDIENCE, JwksUrl(url, min_interval=30, clock=clock))
    await v.start()
    assert state.requests == 1
    old = make_token("auditor", key=state.keys[0], header={"alg": "EdDSA", "kid": "k1"})
    assert (await v.authenticate(f"Bearer {old}")).roles == {"auditor"}
    assert state.requests == 1  # a known kid costs no fetch

    state.keys = [OKPKey.generate_key("Ed25519", parameters={"kid": "k2"})]
    new = make_token("auditor", key=state.keys[0], header={"alg": "EdDSA", "kid": "k2"})
    # Within the minimum interval an unknown kid does not refetch: refused for now.
    with pytest.raises(Unauthenticated):
        await v.authenticate(f"Bearer {new}")
    assert state.requests == 1

    clock.now += 30
    assert (await v.authenticate(f"Bearer {new}")).subject == "test-auditor"
    assert state.requests == 2

    # A flood of random kids cannot make the service hammer the issuer.
    for i in range(20):
        forged = make_token("auditor", key=OKPKey.generate_key("Ed25519"), header={"alg": "EdDSA", "kid": f"r{i}"})
        with pytest.raises(Unauthenticated):
            await v.authenticate(f"Bearer {forged}")
    assert state.requests == 2
    # The rotated-out key no longer verifies.
    with pytest.raises(Unauthenticated):
        await v.authenticate(f"Bearer {old}")


async def test_a_failed_refresh_keeps_the_current_keys(issuer, make_token):
    state, url = issuer
    clock = Clock()
    v = Verifier(KeySet([]), ISSUER, AUDIENCE, JwksUrl(url, min_interval=30, clock=clock))
    await v.start()
    state.fail = True
    clock.now += 60
    await v.refresh()
    assert state.requests == 2
    token = make_token("dac", key=state.keys[0], header={"alg": "EdDSA", "kid": "k1"})
    assert (await v.authenticate(f"Bearer {token}")).roles == {"dac"}


async def test_start_fails_when_the_jwks_cannot_be_fetched(issuer):
    state, url = issuer
    state.fail = True
    v = Verifier(KeySet([]), ISSUER, AUDIENCE, JwksUrl(url))
    with pytest.raises(Exception):
        await v.start()


async def test_jwks_with_private_keys_is_refused(issuer):
    state, url = issuer

    async def private(request: web.Request) -> web.Response:
        return web.json_response({"keys": [k.as_dict(private=True) for k in state.keys]})

    app = web.Application()
    app.router.add_get("/jwks", private)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        with pytest.raises(ValueError, match="private"):
            await Verifier(KeySet([]), ISSUER, AUDIENCE, JwksUrl(str(server.make_url("/jwks")))).start()
    finally:
        await server.close()


def test_configuration_chooses_file_url_or_development_key(tmp_path: Path):
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "f1"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    base = {"CONSENT_LEDGER_DATA_DIR": str(tmp_path / "data")}

    from_file, dev = verifier(config_module.load({**base, "CONSENT_LEDGER_JWKS": str(jwks)}))
    assert not dev and [k.kid for k in from_file.keys] == ["f1"] and from_file.source is None

    from_url, dev = verifier(config_module.load({**base, "CONSENT_LEDGER_JWKS": "https://idp.example/jwks.json",
                                                 "CONSENT_LEDGER_JWKS_MIN_REFRESH_SECONDS": "5"}))
    assert not dev and from_url.source is not None and from_url.source.min_interval == 5

    _, dev = verifier(config_module.load(base))
    assert dev
    with pytest.raises(RuntimeError, match="CONSENT_LEDGER_JWKS"):
        verifier(config_module.load({**base, "CONSENT_LEDGER_ENV": "production"}))


async def test_development_tokens_from_the_cli_verify_against_the_development_key(tmp_path: Path, capsys, monkeypatch):
    from service.cli.main import main

    monkeypatch.setenv("CONSENT_LEDGER_DATA_DIR", str(tmp_path))
    for name in ("CONSENT_LEDGER_JWKS", "CONSENT_LEDGER_ENV", "CONSENT_LEDGER_JWT_ISSUER", "CONSENT_LEDGER_JWT_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["token", "issue", "--role", "sde", "--role", "auditor", "--org", "SDE-NORTH"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    v, development = verifier(config_module.load())
    assert development
    caller = await v.authenticate(f"Bearer {token}")
    assert caller.roles == {"sde", "auditor"} and caller.org == "SDE-NORTH"

    monkeypatch.setenv("CONSENT_LEDGER_ENV", "production")
    assert main(["token", "issue", "--role", "dac"]) == 2


async def test_the_app_fetches_a_jwks_url_before_serving(issuer, make_token, database):
    from aiohttp.test_utils import TestClient

    from service.http.keys import SUPERVISOR
    from service.http.app import create_app

    state, url = issuer
    v = Verifier(KeySet([]), ISSUER, AUDIENCE, JwksUrl(url))
    async with TestClient(TestServer(create_app(app_config(pool_size=2), database, v), host="127.0.0.1")) as client:
        assert state.requests == 1
        token = make_token("auditor", key=state.keys[0], header={"alg": "EdDSA", "kid": "k1"})
        r = await client.get("/v1/events", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200
        assert "jwks-refresher" in client.server.app[SUPERVISOR].tasks  # kept fresh under the supervisor
    assert not client.server.app[SUPERVISOR].tasks  # stopped with the app


async def test_a_token_from_another_data_directory_is_refused_saying_why(tmp_path: Path, database):
    """The mistake of a first hour: a token issued in another folder (another
    development key).  The 401 says what to do, and the log says why."""
    from aiohttp.test_utils import TestClient
    from structlog.testing import capture_logs

    from service.auth.tokens import issue_token, load_or_create_dev_key
    from service.http.app import create_app

    server_dir, other_dir = tmp_path / "server", tmp_path / "other"
    server_dir.mkdir(), other_dir.mkdir()
    server_config = config_module.load({"CONSENT_LEDGER_DATA_DIR": str(server_dir)})
    dev_verifier, development = verifier(server_config)
    assert development
    stranger = issue_token(load_or_create_dev_key(config_module.load({"CONSENT_LEDGER_DATA_DIR": str(other_dir)})),
                           issuer=server_config.jwt_issuer, audience=server_config.jwt_audience,
                           subject="me", roles=["auditor"])
    async with TestClient(TestServer(create_app(app_config(), database, dev_verifier), host="127.0.0.1")) as client:
        with capture_logs() as logs:
            r = await client.get("/v1/events", headers={"Authorization": f"Bearer {stranger}"})
        assert r.status == 401
        detail = (await r.json())["detail"]
        assert "development key" in detail and "CONSENT_LEDGER_DATA_DIR" in detail and "token issue" in detail
        assert not detail.rstrip().endswith(":")
        assert "development key" in r.headers["WWW-Authenticate"]
        refused = [e for e in logs if e["event"] == "token refused"]
        assert refused and "development key" in refused[0]["reason"]
        assert stranger not in str(logs)


def test_refusal_reasons_are_plain_words(signing_key):
    import time

    from joserfc import jwt

    v = Verifier(KeySet.import_key_set({"keys": [signing_key.as_dict(private=False)]}), ISSUER, AUDIENCE)

    def refused(**claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "exp": now + 60, **claims}
        token = jwt.encode({"alg": "EdDSA", "kid": "test-key"}, body, signing_key, algorithms=["EdDSA"])
        with pytest.raises(Unauthenticated) as caught:
            v.caller(f"Bearer {token}")
        return str(caught.value)

    assert "expired" in refused(exp=int(time.time()) - 3600)
    assert f"is not {ISSUER!r}" in refused(iss="someone-else")
    assert "`aud` claim" in refused(aud="another-service")
    assert "not valid yet" in refused(nbf=int(time.time()) + 3600)
    other = OKPKey.generate_key("Ed25519", parameters={"kid": "test-key"})
    forged = jwt.encode({"alg": "EdDSA", "kid": "test-key"}, {"iss": ISSUER, "aud": AUDIENCE, "sub": "s",
                        "exp": int(time.time()) + 60}, other, algorithms=["EdDSA"])
    with pytest.raises(Unauthenticated, match="signature does not verify with any of this service's token keys"):
        v.caller(f"Bearer {forged}")
    with pytest.raises(Unauthenticated, match="not a well-formed JWT"):
        v.caller("Bearer not.a.jwt")
