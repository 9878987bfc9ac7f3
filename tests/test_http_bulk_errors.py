"""The exact RFC 9457 answers to bad bulk bodies, over HTTP, for every bulk
endpoint: the scanner that parses millions of numbers without building
Python strings must say precisely what msgspec and the line parser said
(which entry, which line, which key, which type), and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from samples import auth, data_use, head_position

from service.http.keys import POOL

V = "9434765919"  # valid
DETAIL_1 = ("1 entry is not a valid NHS number (10 digits, modulus-11 check digit, an allocated range; spaces and dashes allowed); "
            "nothing was processed")


def invalid_numbers(*paths: str, detail: str = DETAIL_1) -> tuple[int, str, str, list]:
    return 422, "invalid-nhs-numbers", detail, [[p, "not a valid NHS number"] for p in paths]


def invalid_body(message: str, path: str) -> tuple[int, str, str, list]:
    return 422, "invalid-body", f"{message} (at {path})", [[path, message]]


def duplicate(key: str) -> tuple[int, str, str, list]:
    detail = f"the key {key!r} appears more than once in one object"
    return 400, "duplicate-key", detail, [["$", f"duplicate key {key!r}"]]


FILTER = [
    (f'{{"nhs_numbers": ["{V}", 123]}}', invalid_body("Expected `str`, got `int`", "$.nhs_numbers[1]")),
    (f'{{"nhs_numbers": ["{V}", 1.5, "x"]}}', invalid_body("Expected `str`, got `float`", "$.nhs_numbers[1]")),
    (f'{{"nhs_numbers": ["{V}", "x", null]}}', invalid_body("Expected `str`, got `null`", "$.nhs_numbers[2]")),
    (f'{{"nhs_numbers": [true, "{V}"]}}', invalid_body("Expected `str`, got `bool`", "$.nhs_numbers[0]")),
    (f'{{"nhs_numbers": ["{V}", ["{V}"]]}}', invalid_body("Expected `str`, got `array`", "$.nhs_numbers[1]")),
    (f'{{"nhs_numbers": ["{V}", {{"a": "{V}"}}]}}', invalid_body("Expected `str`, got `object`", "$.nhs_numbers[1]")),
    (f'{{"nhs_numbers": ["{V}", null, {{"a": 1, "a": 2}}]}}', duplicate("a")),
    (f'{{"nhs_numbers": ["{V}", "943476591"]}}', invalid_numbers("$.nhs_numbers[1]")),
    (f'{{"nhs_numbers": ["", "{V}", " - ", "9434,765919", "9434765919\\n", "9434765918"]}}',
     invalid_numbers(*(f"$.nhs_numbers[{i}]" for i in (0, 2, 3, 4, 5)),
                     detail=DETAIL_1.replace("1 entry is", "5 entries are"))),
    ('{"nhs_numbers": [], "x": 1}', invalid_body("Object contains unknown field `x`", "$")),
    ('{"nhs_numbers": [1], "nhs_numbers": []}', duplicate("nhs_numbers")),
    (f'{{"nhs_numbers": ["{V}"], "nhs_numbers": ["{V}"]}}', duplicate("nhs_numbers")),
    # The array is found without decoding the whole body; these must not fool that.
    (f'{{"x": {{"nhs_numbers": ["{V}", "{V}"]}}, "nhs_numbers": ["{V}"]}}',
     invalid_body("Object contains unknown field `x`", "$")),
    (f'{{"x": "nhs_numbers", "nhs_numbers": ["{V}", "{V}"]}}', invalid_body("Object contains unknown field `x`", "$")),
    (f'{{"nhs_numbers": ["{V}", "{V}"], "nhs_numbers": ["9434765918"]}}', duplicate("nhs_numbers")),
    ('[]', invalid_body("Expected `object`, got `array`", "$")),
    ('{}', invalid_body("Object missing required field `nhs_numbers`", "$")),
    ('{"nhs_numbers": "x"}', invalid_body("Expected `array`, got `str`", "$.nhs_numbers")),
    (f'{{"nhs_numbers": ["{V}",]}}',
     (400, "malformed-json", "the body is not valid JSON: JSON is malformed: trailing comma in array (byte 30)", None)),
]

COHORT = [
    (f'["{V}", 1]', invalid_body("Expected `str`, got `int`", "$[1]")),
    ('{"a": 1}', invalid_body("Expected `array`, got `object`", "$")),
    (f'["{V}", "x"]', invalid_numbers("$[1]")),
    ('[]', (422, "invalid-request", "a cohort needs at least one NHS number",
            [["$", "a cohort needs at least one NHS number"]])),
]


def _data_use(numbers_json: str, **extra: str) -> str:
    body = json.dumps(data_use("U-ERR", grant_id="G-ERR"))[:-1]
    return body + f', "nhs_numbers": {numbers_json}' + "".join(f', "{k}": {v}' for k, v in extra.items()) + "}"


DATA_USE = [
    (_data_use(f'["{V}", 123]'), invalid_body("an NHS number must be a string of 10 digits", "$.nhs_numbers[1]")),
    (_data_use(f'["{V}", null]'), invalid_body("an NHS number must be a string of 10 digits", "$.nhs_numbers[1]")),
    (_data_use(f'["{V}", [1]]'), invalid_body("an NHS number must be a string of 10 digits", "$.nhs_numbers[1]")),
    (_data_use(f'["{V}", "943476591"]'),
     invalid_body("an NHS number must be 10 digits (spaces and dashes allowed)", "$.nhs_numbers[1]")),
    (_data_use(f'["{V}", "9434765918", "x"]'), invalid_body("NHS number check digit is wrong", "$.nhs_numbers[1]")),
    (_data_use(f'["{V}", ""]'),
     invalid_body("an NHS number must be 10 digits (spaces and dashes allowed)", "$.nhs_numbers[1]")),
    (_data_use('[]'), invalid_body("`nhs_numbers` must not be empty", "$")),
    (_data_use(f'["{V}"]', cohort_id=json.dumps("a" * 64)),
     invalid_body("give exactly one of `cohort_id` or `nhs_numbers`", "$")),
    (_data_use('null'), invalid_body("give exactly one of `cohort_id` or `nhs_numbers`", "$")),
    (_data_use(f'["{V}"]', x="1"), invalid_body("Object contains unknown field `x`", "$")),
    (_data_use(f'["{V}"]', nhs_numbers=f'["{V}"]'), duplicate("nhs_numbers")),
]


async def _check(client, path: str, token: str, cases, content_type: str = "application/json") -> None:
    for body, (status, slug, detail, errors) in cases:
        r = await client.post(path, data=body.encode(), headers=auth(token, **{"Content-Type": content_type}))
        problem = await r.json()
        got = (r.status, problem["type"].rsplit(":", 1)[1], problem["detail"],
               [[e["path"], e["message"]] for e in problem["errors"]] if "errors" in problem else None)
        assert got == (status, slug, detail, errors), body


async def test_bad_bulk_bodies_get_exact_problems_and_write_nothing(client, make_token, database):
    sde = make_token("sde", org="SDE-NORTH")
    before = await head_position(database)
    await _check(client, "/v1/opt-out-filter", sde, FILTER)
    await _check(client, "/v1/cohorts", sde, COHORT)
    await _check(client, "/v1/data-uses", sde, DATA_USE)
    assert await head_position(database) == before


async def test_the_number_limit_holds_for_every_bulk_endpoint_and_format(client, make_token, database, monkeypatch):
    import service.http.numbers_body

    monkeypatch.setattr(service.http.numbers_body, "MAX_COHORT_SIZE", 3)
    sde = make_token("sde", org="SDE-NORTH")
    four = [V] * 4
    lines = "".join(f"{n}\n" for n in four)
    before = await head_position(database)
    too_many = ("4 NHS numbers in one request; at most 3 are accepted: send larger sets in several requests")
    for path, content_type, body, where in [
        ("/v1/opt-out-filter", "application/json", json.dumps({"nhs_numbers": four}), "$.nhs_numbers"),
        ("/v1/opt-out-filter", "text/plain", lines, "body"),
        ("/v1/opt-out-filter", "application/vnd.nhs.mesh.dat", lines.replace("\n", ",\n"), "body"),
        ("/v1/cohorts", "application/json", json.dumps(four), "$"),
        ("/v1/cohorts", "text/plain", lines, "body"),
        ("/v1/cohorts", "application/vnd.nhs.mesh.dat", lines.replace("\n", ",\n"), "body"),
    ]:
        r = await client.post(path, data=body.encode(), headers=auth(sde, **{"Content-Type": content_type}))
        problem = await r.json()
        assert (r.status, problem["detail"], problem["errors"][0]["path"]) == (422, too_many, where), (path, body)
    r = await client.post("/v1/data-uses", data=_data_use(json.dumps(four)).encode(),
                          headers=auth(sde, **{"Content-Type": "application/json"}))
    assert r.status == 422
    assert (await r.json())["detail"] == "Expected `array` of length <= 3 (at $.nhs_numbers)"
    assert await head_position(database) == before
    three = await client.post("/v1/cohorts", json=four[:3], headers=auth(sde))
    assert three.status == 201
    assert await head_position(database) == before + 1  # CohortStored: who stored it


async def test_five_million_and_one_numbers_are_refused(client, make_token):
    from contracts.bulk import format_lines
    from contracts.values import MAX_COHORT_SIZE

    body = format_lines(np.full(MAX_COHORT_SIZE + 1, int(V[:9]), dtype=np.uint32))
    r = await client.post("/v1/opt-out-filter", data=body,
                          headers=auth(make_token("sde", org="SDE-NORTH"), **{"Content-Type": "text/plain"}))
    assert r.status == 422 and (await r.json())["type"].endswith("too-many-nhs-numbers")


MEDIA_MISTAKES = [
    # (sent as, body, what the detail must tell the caller to use)
    ("text/plain", b"9434765919,\n9434765870,\n", "application/vnd.nhs.mesh.dat"),
    ("application/vnd.nhs.mesh.dat", b"9434765919\n9434765870\n", "Content-Type: text/plain"),
    ("text/plain", b'{"nhs_numbers": ["9434765919"]}', "application/json"),
    ("application/vnd.nhs.mesh.dat", b'["9434765919", "9434765870"]', "application/json"),
    ("application/json", b"9434765919\n9434765870\n", "Content-Type: text/plain"),
    ("application/json", b"9434765919,\r\n9434765870,\r\n", "Content-Type: application/vnd.nhs.mesh.dat"),
]


@pytest.mark.parametrize(("media_type", "body", "use"), MEDIA_MISTAKES)
@pytest.mark.parametrize("path", ["/v1/opt-out-filter", "/v1/cohorts"])
async def test_a_body_sent_with_the_wrong_media_type_says_which_to_use(client, make_token, database, media_type,
                                                                       body, use, path):
    """Every line used to be reported as 'not a valid NHS number', with nothing
    pointing at the comma or the Content-Type."""
    before = await head_position(database)
    r = await client.post(path, data=body, headers={"Authorization": f"Bearer {make_token('sde', org='SDE-NORTH')}",
                                                   "Content-Type": media_type})
    problem = await r.json()
    assert r.status in (400, 422), problem
    assert use in problem["detail"], problem
    assert await head_position(database) == before
    if path == "/v1/cohorts":
        async with client.server.app[POOL].acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM cohorts") == 0


async def test_invalid_numbers_in_the_right_media_type_get_no_media_type_hint(client, make_token):
    r = await client.post("/v1/opt-out-filter", data=b"9434765918\n9434765919\n",
                          headers={"Authorization": f"Bearer {make_token('sde', org='SDE-NORTH')}",
                                   "Content-Type": "text/plain"})
    problem = await r.json()
    assert r.status == 422 and "Content-Type" not in problem["detail"], problem


@pytest.mark.parametrize("media_type", ["text/plain", "application/vnd.nhs.mesh.dat"])
@pytest.mark.parametrize("tail", [b"", b"\r\n", b"\r\n\r\n", b"  \r\n"])
async def test_crlf_lines_are_answered_in_crlf_whatever_follows_them(client, make_token, media_type, tail):
    comma = b"," if media_type.endswith(".dat") else b""
    body = b"".join(n + comma + b"\r\n" for n in (b"9434765919", b"9434765870")) + tail
    r = await client.post("/v1/opt-out-filter", data=body,
                          headers={"Authorization": f"Bearer {make_token('sde', org='SDE-NORTH')}",
                                   "Content-Type": media_type})
    assert r.status == 200, await r.text()
    assert await r.read() == b"9434765919" + comma + b"\r\n9434765870" + comma + b"\r\n"
