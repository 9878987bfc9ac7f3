"""The pages as HTTP answers: what they say, what they refuse, their headers.
(tests/test_browser.py looks at them in a real browser.)"""

from __future__ import annotations

import json
import re

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from contracts import api
from contracts.disclosure import suppressed
from pages_data import HOSTILE, Filled, fill
from samples import auth
from service.pages import charts

PAGES = ["/", "/register", "/register/G-RESEARCH", "/statistics", "/transparency", "/patient", "/docs"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def filled(client: TestClient, make_token) -> Filled:
    return await fill(client.session, str(client.make_url("")).rstrip("/"), make_token)


def _bars(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'data-bars="(\d+)"', html)]


async def test_every_page_is_html_under_a_strict_content_security_policy(client: TestClient, filled: Filled):
    for path in PAGES:
        r = await client.get(path)
        assert r.status == 200 and r.content_type == "text/html", path
        policy = r.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert "script-src 'self'" in policy and "style-src 'self'" in policy
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
        html = await r.text()
        assert '<html lang="en-GB">' in html and "<main" in html
        assert "<script>" not in html and " style=" not in html  # nothing inline for the policy to block
        assert "https://" not in re.sub(r"<pre[^>]*>.*?</pre>", "", html, flags=re.S) or path == "/docs"
    api_answer = await client.get("/v1/register")
    assert api_answer.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_the_home_page_shows_the_latest_checkpoint(client: TestClient, filled: Filled):
    html = await (await client.get("/")).text()
    checkpoint = await (await client.get("/checkpoint")).text()
    size = int(checkpoint.split("\n")[1])
    assert f'id="checkpoint-size">{size:,}<' in html
    for link in ("/register", "/statistics", "/transparency", "/patient", "/docs"):
        assert f'href="{link}"' in html


async def test_the_register_lists_filters_and_escapes_every_grant(client: TestClient, filled: Filled):
    html = await (await client.get("/register")).text()
    assert html.count('<tr class="nhsuk-table__row">') == 2
    assert "North Secure Data Environment" in html and "Yes" in html
    # A grant's own text is shown as text, never as markup.
    search = await (await client.get("/register", params={"q": "cheaper medicines"})).text()
    assert search.count('<tr class="nhsuk-table__row">') == 1 and "G-COMMERCIAL" in search
    assert "<script>alert" not in search
    assert (await (await client.get("/register", params={"commercial": "no"})).text()).count(
        '<tr class="nhsuk-table__row">') == 1
    assert (await (await client.get("/register", params={"purpose": "planning"})).text()).count("G-COMMERCIAL<") == 1
    assert "No grant matches" in await (await client.get("/register", params={"status": "revoked"})).text()
    bad = await client.get("/register", params={"purpose": "marketing"})
    assert bad.status == 400 and bad.content_type == "text/html"
    assert "`purpose` must be one of" in await bad.text()


async def test_a_grant_page_shows_its_uses_and_the_entries_it_rests_on(client: TestClient, filled: Filled):
    html = await (await client.get("/register/G-RESEARCH")).text()
    assert "release-1" in html and f'/v1/proofs/inclusion?position={filled.use_position}"' in html
    proof = await client.get(f"/v1/proofs/inclusion?position={filled.use_position}")
    assert proof.status == 200
    commercial = await (await client.get("/register/G-COMMERCIAL")).text()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in commercial
    assert HOSTILE not in commercial and "No data has been used under this grant yet" in commercial
    missing = await client.get("/register/G-NONE")
    assert missing.status == 404 and missing.content_type == "text/html"
    assert "No such grant" in await missing.text()


async def test_statistics_draw_each_published_figure_and_suppress_small_ones(client: TestClient, filled: Filled):
    html = await (await client.get("/statistics")).text()
    # Over time: 15 national opt-outs (shown as 15), 1 opt-in (suppressed). By channel: app 12 -> 10,
    # its 1 opt-in suppressed, phone 3 -> suppressed, phone opt-ins 0. One use for research, none for
    # planning. Grants 1 commercial and 1 not, uses 0 commercial and 1 not.
    # Datasets: hes-apc used once, gp-prescribing never; no value recorded, so that chart draws nothing.
    assert _bars(html) == [1, 1, 1, 3, 1]
    assert html.count('<rect class="ledger-bar') == 7 and "hes-apc (2 organisations)" in html
    assert "fewer than 10" in html
    assert re.search(r"national data opt-out: <strong>15</strong>", html)  # 14 opted out now, rounded
    choice_figures = "".join(html.split('<section class="ledger-chart"')[1:3]) + html.split("opted-out-now")[1][:400]
    for small in (">1<", ">3<", ">12<", ">14<", "<strong>14<"):
        assert small not in choice_figures, small


async def test_transparency_checks_consistency_between_two_sizes(client: TestClient, filled: Filled):
    html = await (await client.get("/transparency", params={"from": 3, "to": filled.head})).text()
    assert 'id="consistency-result"' in html and "Consistent" in html and "Not consistent" not in html
    keys = await (await client.get("/v1/log-key")).json()
    assert keys["keys"][0] in html
    refused = await client.get("/transparency", params={"from": 5, "to": 2})
    assert refused.status == 400 and "choose 1 ≤ from ≤ to" in await refused.text()


async def test_a_pasted_receipt_is_checked_on_the_server(client: TestClient, filled: Filled, make_token):
    nhs = filled.opted_out[0]
    history = await (await client.get(f"/v1/patients/{nhs}/history",
                                      headers=auth(make_token("patient-app", nhs_number=nhs)))).json()
    position = history["items"][0]["position"]
    receipt = await (await client.get(f"/v1/patients/{nhs}/receipts/{position}",
                                      headers=auth(make_token("patient-app", nhs_number=nhs)))).json()

    async def check(text: str) -> str:
        r = await client.post("/transparency/receipt", data={"receipt": text})
        assert r.status == 200
        return await r.text()

    good = await check(json.dumps(receipt))
    assert "The receipt checks out" in good and "✗" not in good
    tampered = dict(receipt, entry=receipt["entry"].replace('"national"', '"type-1"'))
    assert "the entry was changed" in await check(json.dumps(tampered))
    other_root = dict(receipt, proof=dict(receipt["proof"], hashes=list(reversed(receipt["proof"]["hashes"]))))
    if len(receipt["proof"]["hashes"]) > 1:
        assert "commits to another log" in await check(json.dumps(other_root))
    forged = dict(receipt, checkpoint=receipt["checkpoint"].replace("\n\n", "\nextra\n\n", 1))
    assert "not signed by this log" in await check(json.dumps(forged))
    assert "not a receipt" in await check("{not json")
    assert (await client.post("/transparency/receipt", data=b"receipt=x", headers={"Content-Type": "text/plain"})
            ).status == 415
    assert (await client.post("/transparency/receipt", data={"receipt": ""})).status == 400


async def test_the_patient_page_shows_choices_and_records_a_confirmed_opt_out(
        client: TestClient, filled: Filled, make_token, database):
    nhs = filled.patients[35]  # no choice yet, in no data use
    token = make_token("patient-app", nhs_number=nhs)
    sign_in = await (await client.get("/patient")).text()
    assert '<form method="post" action="/patient" id="sign-in">' in sign_in

    async def act(**fields: str):
        r = await client.post("/patient", data={"token": token, "nhs_number": nhs, **fields})
        return r.status, await r.text()

    status, shown = await act(action="show")
    assert status == 200 and "No choice recorded" in shown and "Nothing yet." in shown
    status, asked = await act(action="opt-out", scope="national")
    assert status == 200 and "Please confirm" in asked and "opt out" in asked
    key = re.search(r'name="key" value="([0-9a-f]+)"', asked).group(1)
    choices = await (await client.get(f"/v1/patients/{nhs}/choices", headers=auth(token))).json()
    assert choices["scopes"]["national"]["state"] == "not-recorded"  # asking wrote nothing
    status, done = await act(action="opt-out", scope="national", confirmed="yes", key=key)
    assert status == 200 and "Recorded" in done and "Opted out since" in done
    again = await client.post("/patient", data={"token": token, "nhs_number": nhs, "action": "opt-out",
                                                "scope": "national", "confirmed": "yes", "key": key})
    assert again.status == 200  # the same confirmation sent twice is one write
    choices = await (await client.get(f"/v1/patients/{nhs}/choices", headers=auth(token))).json()
    assert choices["scopes"]["national"]["state"] == "opted-out"
    position = choices["scopes"]["national"]["position"]
    status, listed = await act(action="show")
    assert listed.count('class="ledger-timeline__item ledger-timeline__item--choice"') == 1
    status, receipt = await act(action="receipt", position=str(position))
    assert status == 200 and "The receipt checks out" in receipt
    # The NHS number travels in form bodies only: never in a link or a form's address.
    for html in (shown, asked, done, listed, receipt):
        assert not re.search(rf'(href|action)="[^"]*{nhs}', html)


async def test_the_patient_page_explains_refusals(client: TestClient, filled: Filled, make_token):
    nhs = filled.patients[21]
    r = await client.post("/patient", data={"token": "not-a-token", "nhs_number": nhs, "action": "show"})
    assert r.status == 401 and "nhsuk-error-summary" in await r.text()
    other = make_token("patient-app", nhs_number=filled.patients[22])
    r = await client.post("/patient", data={"token": other, "nhs_number": nhs, "action": "show"})
    assert r.status == 403 and "only act for its own patient" in await r.text()
    r = await client.post("/patient", data={"token": other, "nhs_number": "9434765918", "action": "show"})
    assert r.status == 422 and "NHS number" in await r.text()
    r = await client.post("/patient", data={"token": other, "nhs_number": nhs, "action": "delete-everything"})
    assert r.status == 400
    r = await client.post("/patient", data=f"token=a&token=b&nhs_number={nhs}", headers=FORM)
    assert r.status == 400 and "more than once" in await r.text()
    r = await client.post("/patient", data=b"x" * (65 * 1024), headers=FORM)
    assert r.status == 413 and r.content_type == "text/html"


async def test_the_api_reference_describes_every_operation(client: TestClient):
    html = await (await client.get("/docs")).text()
    document = await (await client.get("/openapi.json")).json()
    for op in api.OPERATIONS:
        if op.page:
            assert op.id not in json.dumps(document)  # pages are not part of the API
            continue
        assert op.description, f"{op.id} has no description"
        assert f'id="{op.id}"' in html
    assert 'id="schema-Receipt"' in html


async def test_static_files_are_served_only_from_their_folder(client: TestClient):
    css = await client.get("/static/nhsuk/nhsuk-frontend.min.css")
    assert css.status == 200 and css.content_type == "text/css"
    assert "assets.nhs.uk" not in await css.text()  # no font or image from a CDN
    assert (await client.get("/static/receipt-check.js")).content_type in ("text/javascript", "application/javascript")
    for outside in ("/static/../rendering.py", "/static/%2e%2e/rendering.py", "/static/nhsuk/../../cache.py",
                    "/static/missing.css"):
        assert (await client.get(outside)).status == 404, outside


async def test_an_unknown_address_answers_people_with_a_page_and_programs_with_a_problem(client: TestClient):
    page = await client.get("/no-such-page", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status == 404 and page.content_type == "text/html"
    problem = await client.get("/no-such-page")
    assert problem.status == 404 and problem.content_type == "application/problem+json"


@given(st.integers(min_value=0, max_value=10**8))
def test_suppression_never_publishes_a_small_count_and_rounds_to_five(count: int):
    shown = suppressed(count)
    if count == 0:
        assert shown == 0
    elif count < 10:
        assert shown is None
    else:
        assert shown is not None and shown % 5 == 0 and shown >= 10 and abs(shown - count) <= 2


def test_a_chart_scales_bars_to_the_largest_and_leaves_suppressed_ones_undrawn():
    chart = charts.horizontal("t", [("a", "x", 100), ("b", "x", 50), ("c", "x", None), ("d", "x", 0)], ["x"])
    widths = [bar.width for bar in chart.bars]
    assert widths[0] == charts.WIDTH - charts.VALUE_ROOM and widths[1] == widths[0] / 2 and widths[2:] == [0, 0]
    assert [b.label for b in chart.drawn] == ["a", "b"]
