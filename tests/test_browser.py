"""The pages in a real browser: Debian's Chromium, headless, driven by
Playwright (never a downloaded browser), against `consent-ledger serve` on
loopback with a small ledger, and checked with axe-core."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import AUDIENCE, ISSUER
from live_server import LiveServer
from pages_data import Filled, fill
from samples import auth

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="browser tests need Debian's Chromium: `apt-get install -y chromium` (.ci/run installs it where it can)")

PAGES = ["/", "/register", "/register/G-RESEARCH", "/statistics", "/transparency", "/patient", "/docs"]


@pytest.fixture
async def site(database, signing_key, make_token, tmp_path: Path) -> AsyncIterator[tuple[LiveServer, Filled]]:
    server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                        workdir=tmp_path)
    try:
        server.wait_ready()
        async with aiohttp.ClientSession() as session:
            filled = await fill(session, server.url, make_token)
        yield server, filled
    finally:
        server.stop()


@pytest.fixture
async def browser() -> AsyncIterator:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser, site):
    context = await browser.new_context()
    tab = await context.new_page()
    tab.problems = []  # console errors (a CSP violation is one) and uncaught exceptions
    tab.on("console", lambda m: tab.problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.problems.append(str(e)))
    yield tab
    await context.close()


async def test_a_member_of_the_public_finds_the_ledger_and_the_register(page, site):
    server, filled = site
    await page.goto(server.url + "/")
    assert await page.locator("h1").inner_text() == "Who used patients' data, and whether their choices were honoured"
    assert int((await page.locator("#checkpoint-size").inner_text()).replace(",", "")) >= filled.use_position
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Register").click()
    assert await page.locator("#register-table tbody tr").count() == 2
    await page.get_by_label("Search organisation, purpose, datasets or grant").fill("statin")
    await page.get_by_role("button", name="Show grants").click()
    rows = page.locator("#register-table tbody tr")
    assert await rows.count() == 1 and "G-RESEARCH" in await rows.first.inner_text()
    await page.get_by_role("link", name="G-RESEARCH").click()
    assert "release-1" in await page.locator("#uses-table").inner_text()
    assert page.url.endswith("/register/G-RESEARCH") and page.problems == []


async def test_the_statistics_page_draws_its_charts(page, site):
    server, _ = site
    await page.goto(server.url + "/statistics")
    charts = page.locator("svg.ledger-svg")
    assert await charts.count() == 5  # the sixth, value returned, has nothing to draw yet
    assert [await charts.nth(i).locator("rect.ledger-bar").count() for i in range(5)] == [1, 1, 1, 3, 1]
    assert await page.locator("rect.ledger-bar").first.bounding_box() is not None  # drawn, not hidden
    assert "fewer than 10" in await page.locator("main").inner_text()
    assert page.problems == []


async def test_a_patient_opts_out_sees_it_in_their_history_and_verifies_the_receipt(page, site, make_token):
    server, filled = site
    nhs = filled.patients[36]
    await page.goto(server.url + "/patient")
    await page.get_by_label("Patient app token").fill(make_token("patient-app", nhs_number=nhs))
    await page.get_by_label("NHS number").fill(nhs)
    await page.get_by_role("button", name="Show my choices and history").click()
    assert await page.locator("#history").count() == 0 and "Nothing yet." in await page.locator("main").inner_text()
    await page.locator("#choices tr", has_text="national data opt-out").get_by_role("button", name="Opt out").click()
    assert "You are about to opt out" in await page.locator(".ledger-confirm").inner_text()
    await page.get_by_role("button", name="Yes, record this").click()
    assert "Recorded" in await page.get_by_role("status").first.inner_text()
    assert "Opted out since" in await page.locator("#choices").inner_text()
    items = page.locator("#history li")
    assert await items.count() == 1 and "opted out" in (await items.first.inner_text()).lower()
    assert nhs not in page.url
    await items.first.get_by_role("button", name="Receipt and verify").click()
    assert "The receipt checks out" in await page.locator("#receipt .ledger-result").first.inner_text()
    await page.get_by_role("button", name="Verify it in this browser").click()
    checked = page.locator("#receipt-result [data-checked-in=browser]")
    await checked.wait_for()
    assert "The receipt checks out (checked in this browser)" in await checked.inner_text()
    assert page.problems == []


async def test_a_pasted_receipt_is_verified_in_the_browser_and_a_tampered_one_is_not(page, site, make_token):
    server, filled = site
    nhs = filled.opted_out[0]
    headers = auth(make_token("patient-app", nhs_number=nhs))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/patients/{nhs}/history", headers=headers) as r:
            position = (await r.json())["items"][0]["position"]
        async with session.get(f"{server.url}/v1/patients/{nhs}/receipts/{position}", headers=headers) as r:
            receipt = await r.json()
    await page.goto(server.url + "/transparency")
    for text, verdict in ((json.dumps(receipt), "The receipt checks out"),
                          (json.dumps(dict(receipt, entry=receipt["entry"].replace("national", "type-1"))),
                           "does not check out")):
        await page.get_by_label("Receipt").fill(text)
        await page.get_by_role("button", name="Check this receipt").click()
        result = page.locator("#receipt-result [data-checked-in=browser]")
        await result.wait_for()
        assert verdict in await result.inner_text()
        assert page.url.endswith("/transparency")  # checked here, not sent to the server
    await page.get_by_label("Earlier size (entries)").fill("2")
    await page.get_by_role("button", name="Check consistency").click()
    assert "Consistent" in await page.locator("#consistency-result").inner_text()
    assert page.problems == []


async def test_every_page_passes_axe_with_no_serious_or_critical_violation(page, site, make_token):
    from axe_playwright_python.async_playwright import Axe

    server, filled = site
    axe = Axe()
    found = {}
    for path in PAGES:
        await page.goto(server.url + path)
        found[path] = await axe.run(page)
    # The timeline itself, signed in, with a confirmation showing.
    await page.goto(server.url + "/patient")
    await page.get_by_label("Patient app token").fill(make_token("patient-app", nhs_number=filled.opted_out[0]))
    await page.get_by_label("NHS number").fill(filled.opted_out[0])
    await page.get_by_role("button", name="Show my choices and history").click()
    found["/patient (signed in)"] = await axe.run(page)
    serious = {path: [(v["id"], v["impact"], v["help"]) for v in result.response["violations"]
                      if v["impact"] in ("serious", "critical")] for path, result in found.items()}
    assert serious == {path: [] for path in found}
    assert all(result.response["passes"] for result in found.values())  # axe really ran its rules
    assert page.problems == []
