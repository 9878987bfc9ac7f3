"""Authentication and authorisation through HTTP: every operation in the
role table, every role, no token and each kind of bad token."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import pytest
from aiohttp import web
from conftest import AUDIENCE, ISSUER, app_config
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, OKPKey
from samples import VALID, auth, choice, data_use, grant, head_position

from contracts import api
from service.app.read_records import READ_HEADER
from service.auth.tokens import Verifier
from service.http.app import create_app
from service.store.database import Database

PATIENT, OTHER_PATIENT = VALID[0], VALID[1]
OWN_ORG, OTHER_ORG = "SDE-NORTH", "SDE-SOUTH"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "attacker", "roles": list(api.ROLES),
            "org": OWN_ORG, "iat": now, "nbf": now, "exp": now + 600}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def bad_tokens(make_token, signing_key: OKPKey) -> dict[str, str]:
    """Tokens that must each be refused with 401 invalid_token, although every
    one of them claims every role."""
    now = int(time.time())
    all_roles = {"roles": list(api.ROLES), "org": OWN_ORG}
    good = make_token(**all_roles)
    head, payload, signature = good.split(".")
    public_x = signing_key.as_dict(private=False)["x"]
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered_claims["sub"] = "someone-else"
    return {
        "expired": make_token(**all_roles, iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        "not-yet-valid": make_token(**all_roles, nbf=now + 3600, exp=now + 7200),
        "wrong-audience": make_token(**all_roles, aud="another-service"),
        "wrong-issuer": make_token(**all_roles, iss="https://evil.test"),
        "unsigned-alg-none": f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}."
                             f"{_b64(json.dumps(_claims()).encode())}.",
        "hs256-with-public-key": jwt.encode({"alg": "HS256", "kid": "test-key"}, _claims(),
                                            OctKey.import_key(base64.urlsafe_b64decode(public_x + "==")),
                                            algorithms=["HS256"]),
        "hs256-with-public-jwk": jwt.encode({"alg": "HS256", "kid": "test-key"}, _claims(),
                                            OctKey.import_key(json.dumps(signing_key.as_dict(private=False))),
                                            algorithms=["HS256"]),
        "tampered-payload": f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{signature}",
        "tampered-signature": f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}",
        "unknown-key": make_token(**all_roles, key=OKPKey.generate_key("Ed25519"),
                                  header={"alg": "EdDSA", "kid": "test-key"}),
        "missing-sub": jwt.encode({"alg": "EdDSA", "kid": "test-key"}, _claims(sub=None), signing_key,
                                  algorithms=["EdDSA"]),
        "missing-exp": jwt.encode({"alg": "EdDSA", "kid": "test-key"}, _claims(exp=None), signing_key,
                                  algorithms=["EdDSA"]),
        "oversized-sub": make_token(**all_roles, subject="x" * 201),
        "bad-org-claim": make_token(roles=list(api.ROLES), org="not an org code!"),
        "roles-not-a-list": make_token(roles="auditor"),
        "bad-nhs-number-claim": make_token(**all_roles, nhs_number="1234567890"),
        "garbage": "not-a-jwt",
        "garbage-three-parts": "a.b.c",
        "empty-parts": "..",
    }


async def _arrange(client, make_token) -> None:
    """A grant of each organisation and one patient event, so allowed calls can succeed."""
    dac = make_token("dac")
    for grant_id, org in (("G-OWN", OWN_ORG), ("G-OTHER", OTHER_ORG), ("G-SPARE", OWN_ORG)):
        r = await client.post("/v1/grants", json=grant(grant_id, org=org), headers=auth(dac))
        assert r.status == 201, await r.text()
    r = await client.post(f"/v1/patients/{PATIENT}/opt-out", json=choice("type-1"),
                          headers=auth(make_token("patient-app")))
    assert r.status == 201


_PATH_SAMPLES = {"nhs": PATIENT, "grant_id": "G-OWN", "position": "1"}


def _path(op: api.Operation, **values: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[0]
        # A new path parameter gets a harmless sample; add a better one above if its calls need it.
        return values.get(name, _PATH_SAMPLES.get(name, "1"))

    return re.sub(r"\{([^}]+)\}", sub, op.path)


# Built per call: a data use must occur after its grant was recorded.
_BODIES: dict[str, Any] = {
    "opt_out": choice,
    "opt_in": choice,
    "give_consent": lambda: {"grant_id": "G-OWN", "actor": {"kind": "patient"}},
    "create_grant": lambda: grant("G-NEW"),
    "revoke_grant": lambda: {"reason": "the study ended"},
    "record_data_use": lambda: data_use("use-matrix", "G-OWN", nhs_numbers=[VALID[2]]),
}


# Revoking the grant the other calls use would make them fail for the wrong reason.
_PATHS: dict[str, dict[str, str]] = {"revoke_grant": {"grant_id": "G-SPARE"}}


async def _call(client, op: api.Operation, headers: dict[str, str], **path: str):
    body = _BODIES.get(op.id, dict)() if op.request is not None and not op.body_optional else None
    return await client.request(op.method, _path(op, **{**_PATHS.get(op.id, {}), **path}), json=body,
                                headers=headers)


def _role_tokens(make_token) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (token, the roles it carries)."""
    return {
        "patient-app": (make_token("patient-app"), frozenset({"patient-app"})),
        "patient-app-for-patient": (make_token("patient-app", nhs_number=PATIENT), frozenset({"patient-app"})),
        # Approving a grant acts for an organisation, so the committees' tokens carry one.
        "dac": (make_token("dac", org="DAC-ORG"), frozenset({"dac"})),
        "cag": (make_token("cag", org="CAG-ORG"), frozenset({"cag"})),
        "sde": (make_token("sde", org=OWN_ORG), frozenset({"sde"})),
        "auditor": (make_token("auditor"), frozenset({"auditor"})),
        "no-roles": (make_token(None), frozenset()),
        "unknown-role": (make_token("superuser"), frozenset()),
    }


async def test_role_by_endpoint_matrix(client, make_token, signing_key):
    await _arrange(client, make_token)
    wrong: list[str] = []

    for op in api.OPERATIONS:
        # No credentials at all.
        r = await _call(client, op, {})
        if op.roles:
            if r.status != 401 or r.headers.get("WWW-Authenticate") != 'Bearer realm="consent-ledger"':
                wrong.append(f"{op.id} without a token: {r.status} {r.headers.get('WWW-Authenticate')}")
            elif r.content_type != ("application/fhir+json" if op.fhir else "application/problem+json"):
                # FHIR routes answer an OperationOutcome (issue 15), the rest an RFC 9457 problem.
                wrong.append(f"{op.id} without a token: {r.content_type}")
        elif r.status in (401, 403) or r.status >= 500:
            wrong.append(f"public {op.id} without a token: {r.status}")

        # Not the Bearer scheme.
        if op.roles:
            r = await _call(client, op, {"Authorization": "Basic dXNlcjpwYXNz"})
            if r.status != 401:
                wrong.append(f"{op.id} with Basic auth: {r.status}")

        # Every kind of bad token: refused before the role is even considered.
        for kind, token in bad_tokens(make_token, signing_key).items():
            r = await _call(client, op, auth(token))
            if not op.roles:
                continue
            challenge = r.headers.get("WWW-Authenticate", "")
            if r.status != 401 or 'error="invalid_token"' not in challenge:
                wrong.append(f"{op.id} with {kind} token: {r.status} {challenge!r}")

        # Each role: allowed roles never see 401/403 (nor a 5xx); the rest get exactly 403.
        for name, (token, roles) in _role_tokens(make_token).items():
            r = await _call(client, op, auth(token))
            allowed = (not op.roles or bool(roles & op.roles)) and not (op.backend_only and name.endswith("-for-patient"))
            if allowed and (r.status in (401, 403) or r.status >= 500):
                wrong.append(f"{op.id} as {name}: {r.status} {await r.text()}")
            if allowed and r.status == 200 and _serves_personal_data(op) and READ_HEADER not in r.headers:
                wrong.append(f"{op.id} as {name}: personal data served without a recorded read "
                             "(call service.app.read_records.record_read before answering)")
            if not allowed and r.status != 403:
                wrong.append(f"{op.id} as {name}: expected 403, got {r.status}")
            if not allowed and 'error="insufficient_scope"' not in r.headers.get("WWW-Authenticate", ""):
                wrong.append(f"{op.id} as {name}: 403 without an insufficient_scope challenge")

    assert not wrong, "\n".join(wrong)


def _serves_personal_data(op: api.Operation) -> bool:
    """Reads only patient apps and auditors may make hold personal data; each must be recorded.
    (A backend's own subscriptions name no patient; their notification feed does, and is recorded.)"""
    return op.recorded or (op.method == "GET" and bool(op.roles) and op.roles <= {"patient-app", "auditor"}
                           and not op.backend_only)


async def test_allowed_calls_in_the_matrix_really_succeed(client, make_token):
    """The matrix's allowed cells are not vacuous: with a real body they do the job."""
    await _arrange(client, make_token)
    for name, (token, roles) in _role_tokens(make_token).items():
        for op in api.OPERATIONS:
            if op.id not in _BODIES or not roles & op.roles:
                continue
            r = await _call(client, op, auth(token))
            # 200 = already in force; 409 = a second role re-creating the same grant.
            assert r.status in (op.success, 200, 409), (name, op.id, r.status, await r.text())


async def test_refused_tokens_write_nothing(client, make_token, signing_key, database):
    await _arrange(client, make_token)
    before = await head_position(database)
    writes = [op for op in api.OPERATIONS if op.method in ("POST", "PUT", "DELETE", "PATCH") and op.roles]
    for token in bad_tokens(make_token, signing_key).values():
        for op in writes:
            assert (await _call(client, op, auth(token))).status == 401
    for token, roles in _role_tokens(make_token).values():
        for op in writes:
            if not roles & op.roles:
                assert (await _call(client, op, auth(token))).status == 403
    assert await head_position(database) == before


async def test_patient_token_cannot_act_for_another_patient(client, make_token, database):
    await _arrange(client, make_token)
    token = make_token("patient-app", nhs_number=OTHER_PATIENT)
    before = await head_position(database)
    patient_ops = [op for op in api.OPERATIONS if "{nhs}" in op.path]
    assert patient_ops
    for op in patient_ops:
        r = await _call(client, op, auth(token), nhs=PATIENT)
        assert r.status == 403, (op.id, r.status)
        assert PATIENT not in await r.text()
    assert await head_position(database) == before
    # Its own patient, written with spaces, is the same patient.
    spaced = f"{OTHER_PATIENT[:3]} {OTHER_PATIENT[3:6]} {OTHER_PATIENT[6:]}"
    r = await client.get(f"/v1/patients/{spaced}/choices", headers=auth(token))
    assert r.status == 200 and (await r.json())["nhs_number"] == OTHER_PATIENT


async def test_sde_only_under_its_own_organisations_grants(client, make_token, database):
    await _arrange(client, make_token)
    own, other = make_token("sde", org=OWN_ORG), make_token("sde", org=OTHER_ORG)
    assert (await client.get("/v1/grants/G-OWN", headers=auth(own))).status == 200
    assert (await client.get("/v1/grants/G-OWN", headers=auth(other))).status == 403
    before = await head_position(database)
    r = await client.post("/v1/data-uses", json=data_use("use-x", "G-OWN", nhs_numbers=[VALID[2]]),
                          headers=auth(other))
    assert r.status == 403, await r.text()
    assert "another organisation" in (await r.json())["detail"]
    no_org = make_token("sde")
    r = await client.post("/v1/data-uses", json=data_use("use-y", "G-OWN", nhs_numbers=[VALID[2]]),
                          headers=auth(no_org))
    assert r.status == 403
    assert await head_position(database) == before
    r = await client.post("/v1/data-uses", json=data_use("use-z", "G-OWN", nhs_numbers=[VALID[2]]),
                          headers=auth(own))
    assert r.status == 201, await r.text()


async def test_es256_tokens_are_accepted(database, make_token):
    ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    keys = KeySet.import_key_set({"keys": [ec.as_dict(private=False)]})
    token = make_token("auditor", key=ec, header={"alg": "ES256", "kid": "ec-1"})
    caller = await Verifier(keys, ISSUER, AUDIENCE).authenticate(f"Bearer {token}")
    assert caller.roles == {"auditor"} and caller.subject == "test-auditor"


def test_every_route_has_a_rule_in_the_operation_table(verifier):
    """A route added to the app without an entry (and so a role rule) in
    contracts.api.OPERATIONS fails the build."""
    app = create_app(app_config(), Database(owner_dsn="postgresql://unused", embedded=False), verifier)
    table = {(op.method, api.openapi_path(op.path)): op for op in api.OPERATIONS}
    seen = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD beside each GET
            continue
        key = (route.method, route.resource.canonical)
        assert key in table, f"route {key} has no entry (and so no role rule) in contracts.api.OPERATIONS"
        seen.add(key)
    assert seen == set(table), f"operations without a route: {set(table) - seen}"
    for op in api.OPERATIONS:
        assert op.roles <= set(api.ROLES), f"{op.id} names an unknown role"
        assert op.body_limit > 0


def test_router_walk_would_catch_a_route_without_a_rule(verifier):
    app = create_app(app_config(), Database(owner_dsn="postgresql://unused", embedded=False), verifier)

    async def sneaky(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/sneaky", sneaky)
    table = {(op.method, api.openapi_path(op.path)) for op in api.OPERATIONS}
    unruled = [r.resource.canonical for r in app.router.routes()
               if r.method != "HEAD" and (r.method, r.resource.canonical) not in table]
    assert unruled == ["/v1/sneaky"]


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer", "Token abc", "Bearer a b"])
async def test_malformed_authorization_headers_are_401(client, header):
    r = await client.get("/v1/events", headers={"Authorization": header})
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
