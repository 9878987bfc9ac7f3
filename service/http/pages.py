"""Pages for people: the register, statistics, transparency, the patient
timeline and the API reference, rendered on the server from the same
projections and proofs the API serves."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiohttp
import msgspec
from aiohttp import web

from contracts import api, bodies, merkle, note
from contracts.codes import LABELS, OptOutScope, Purpose, values
from contracts.decision import RECORDED_STATUSES
from contracts.nhs_number import InvalidNhsNumber, NhsNumber
from projections import reads as projection_reads
from service.app.caller import Caller
from service.audit.receipts import check_receipt
from service.http.grants import published_statistics
from service.http.keys import CHECKPOINTS, CONFIG, OPENAPI, TILES
from service.http.problems import ProblemError, invalid
from service.http.requests import Handler, read_body, reads
from service.pages import charts
from service.pages.patient_api import ApiRefused, PatientApi
from service.pages.rendering import asset, render

FORM = "application/x-www-form-urlencoded"
HISTORY_WAITS = 30  # tenths of a second


async def home(request: web.Request, caller: Caller | None) -> web.Response:
    checkpoints, config = request.app[CHECKPOINTS], request.app[CONFIG]
    latest = await checkpoints.latest()
    witnesses = [vkey for _, vkey in config.witnesses]
    witnessed = await checkpoints.witnessed(witnesses, config.witness_quorum) if witnesses else None
    return render("home.html", nav="home", checkpoint=latest, root=latest.root.hex(),
                  witnesses=[vkey.split("+", 1)[0] for vkey in witnesses], quorum=config.witness_quorum,
                  witnessed=witnessed)


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str:
    value = request.query.get(name, "")
    if value and value not in allowed:
        raise invalid(f"`{name}` must be one of {', '.join(allowed)}", f"query.{name}", status=400)
    return value


async def register(request: web.Request, caller: Caller | None) -> web.Response:
    query = request.query.get("q", "").strip()[:200]
    purpose = _choice(request, "purpose", values(Purpose))
    status = _choice(request, "status", RECORDED_STATUSES)
    commercial = _choice(request, "commercial", ("yes", "no"))
    async with reads(request).acquire() as conn:
        reg = await projection_reads.register(conn)
    words = query.casefold().split()

    def wanted(g: bodies.RegisterEntry) -> bool:
        text = " ".join([g.grant_id, g.organisation.code, g.organisation.name, g.purpose.label,
                         g.purpose_description, g.patient_benefit, *g.datasets]).casefold()
        return (all(w in text for w in words) and (not purpose or g.purpose.code == purpose)
                and (not status or g.status == status)
                and (not commercial or g.commercial == (commercial == "yes")))

    shown = [g for g in reversed(reg.grants) if wanted(g)]  # newest first
    return render("register.html", nav="register", register=reg, grants=shown, query=query,
                  purpose=purpose, status=status, commercial=commercial,
                  purposes=[(code, LABELS[code]) for code in values(Purpose)], statuses=RECORDED_STATUSES)


async def grant(request: web.Request, caller: Caller | None) -> web.Response:
    grant_id = request.match_info["grant_id"]
    async with reads(request).acquire() as conn:
        reg = await projection_reads.register(conn, grant_id)
        if not reg.grants:
            raise ProblemError(404, "not-found", "No such grant",
                               f"the register holds no grant {grant_id!r}; search the register for it")
        uses = await projection_reads.grant_uses(conn, grant_id)
    return render("grant.html", nav="register", register=reg, grant=reg.grants[0], uses=uses)


async def statistics_page(request: web.Request, caller: Caller | None) -> web.Response:
    stats = await published_statistics(request)
    scopes = {scope: LABELS[scope] for scope in values(OptOutScope)}
    over_time = charts.horizontal(
        "Opt-outs and opt-ins recorded, by " + stats.period,
        [row for c in stats.choices_over_time for row in (
            (f"{c.period} {scopes[c.scope]}: opt-outs", "opt-out", c.opt_outs),
            (f"{c.period} {scopes[c.scope]}: opt-ins", "opt-in", c.opt_ins))],
        ["opt-out", "opt-in"])
    by_channel = charts.horizontal(
        "Opt-outs and opt-ins by scope and channel",
        [row for c in stats.choices_by_channel for row in (
            (f"{scopes[c.scope]}, {c.channel}: opt-outs", "opt-out", c.opt_outs),
            (f"{scopes[c.scope]}, {c.channel}: opt-ins", "opt-in", c.opt_ins))],
        ["opt-out", "opt-in"])
    per_purpose = charts.horizontal("Data uses per purpose",
                                    [(p.purpose.label, "use", p.uses) for p in stats.uses_by_purpose], ["use"])
    share = stats.commercial
    commercial = charts.horizontal("Commercial and non-commercial", [
        ("Grants: commercial", "commercial", share.commercial_grants),
        ("Grants: not commercial", "other", share.grants - share.commercial_grants),
        ("Uses: commercial", "commercial", share.commercial_uses),
        ("Uses: not commercial", "other", share.uses - share.commercial_uses)], ["commercial", "other"])
    datasets = charts.horizontal(
        "Uses of each dataset (and how many organisations may use it)",
        [(f"{d.dataset} ({d.organisations} organisation{'s' if d.organisations != 1 else ''})", "use", d.uses)
         for d in stats.datasets], ["use"])
    value = charts.horizontal(
        "Value returned to the NHS under grants, in whole units of each currency",
        [row for v in stats.value for row in ((f"{v.currency} received", "other", v.received // 100),
                                              (f"{v.currency} allocated to care services", "commercial",
                                               v.allocated // 100))], ["other", "commercial"])
    return render("statistics.html", nav="statistics", stats=stats,
                  charts=[over_time, by_channel, per_purpose, commercial, datasets, value], scopes=scopes)


@dataclass(frozen=True)
class Consistency:
    old: int
    new: int
    old_root: str
    new_root: str
    hashes: list[str]
    verified: bool
    detail: str


async def _consistency(request: web.Request, head: int) -> Consistency | None:
    raw_old, raw_new = request.query.get("from"), request.query.get("to")
    if not raw_old and not raw_new:
        return None
    try:
        old, new = int(raw_old or ""), int(raw_new or "")
    except ValueError:
        raise invalid("`from` and `to` must both be whole numbers of entries", "query.from", status=400) from None
    if not 1 <= old <= new <= head:
        raise invalid(f"choose 1 ≤ from ≤ to ≤ {head:,} (the latest checkpoint's size)", "query.from", status=400)
    pool, tiles = reads(request, new), request.app[TILES]
    async with pool.acquire() as conn:
        old_root, new_root = await tiles.root(conn, old), await tiles.root(conn, new)
        proof = await tiles.consistency(conn, old, new)
    try:
        merkle.verify_consistency(old, new, old_root, new_root, proof)
        verified, detail = True, f"the log of {new:,} entries extends the log of {old:,} entries without changing it"
    except merkle.ProofError as exc:
        verified, detail = False, str(exc)
    return Consistency(old, new, old_root.hex(), new_root.hex(), [h.hex() for h in proof], verified, detail)


async def transparency(request: web.Request, caller: Caller | None) -> web.Response:
    return await _transparency(request)


async def _transparency(request: web.Request, *, receipt: str = "", checks: list | None = None) -> web.Response:
    checkpoints = request.app[CHECKPOINTS]
    latest = await checkpoints.latest()
    consistency = await _consistency(request, latest.size)
    return render("transparency.html", nav="transparency", checkpoint=latest,
                  witnesses=[vkey for _, vkey in request.app[CONFIG].witnesses],
                  quorum=request.app[CONFIG].witness_quorum,
                  origin=checkpoints.origin, vkeys=[v.vkey for v in checkpoints.verifiers],
                  base_url=f"{request.scheme}://{request.host}", consistency=consistency,
                  receipt=receipt, checks=checks)


async def _form(request: web.Request, op_id: str) -> dict[str, str]:
    if request.content_type != FORM:
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the page's form ({FORM})")
    raw = await read_body(request, api.BY_ID[op_id].body_limit)
    try:
        fields = parse_qs(bytes(raw).decode(), keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise invalid("the form could not be read", "form", status=400) from None
    if any(len(v) > 1 for v in fields.values()):
        raise invalid("a form field appears more than once", "form", status=400)
    return {k: v[0] for k, v in fields.items()}


async def check_receipt_page(request: web.Request, caller: Caller | None) -> web.Response:
    pasted = (await _form(request, "page_check_receipt")).get("receipt", "").strip()
    if not pasted:
        raise invalid("paste a receipt (the JSON a patient app shows) into the box", "form.receipt", status=400)
    checkpoints = request.app[CHECKPOINTS]
    checks = check_receipt(pasted, checkpoints.verifiers, checkpoints.origin)
    return await _transparency(request, receipt=pasted, checks=checks)


# --- the patient timeline -------------------------------------------------------------------

ACTIONS = ("show", "opt-out", "opt-in", "withdraw", "receipt")


@dataclass
class PatientForm:
    token: str
    nhs: str
    action: str
    scope: str
    grant_id: str
    position: int
    confirmed: bool
    key: str


def _patient_form(fields: dict[str, str]) -> PatientForm:
    token = fields.get("token", "").strip()
    if not token:
        raise invalid("paste the patient app's token: it is what lets this page act for the patient",
                      "form.token", status=400)
    try:
        nhs = str(NhsNumber(fields.get("nhs_number", "").replace(" ", "")))
    except (InvalidNhsNumber, TypeError) as exc:
        raise invalid(f"NHS number: {exc}", "form.nhs_number", status=422) from None
    action = fields.get("action", "show")
    if action not in ACTIONS:
        raise invalid(f"unknown action {action!r}", "form.action", status=400)
    scope = fields.get("scope", "")
    if action in ("opt-out", "opt-in") and scope not in values(OptOutScope):
        raise invalid("choose which opt-out: national or type-1", "form.scope", status=400)
    if action == "withdraw" and not fields.get("grant_id"):
        raise invalid("say which consent to withdraw (its grant)", "form.grant_id", status=400)
    position = fields.get("position", "0")
    if action == "receipt" and not (position.isdigit() and 0 < int(position) < 2**62):
        raise invalid("a receipt is asked for by its ledger position", "form.position", status=400)
    key = fields.get("key", "")
    return PatientForm(token, nhs, action, scope, fields.get("grant_id", ""),
                       int(position) if position.isdigit() else 0, fields.get("confirmed") == "yes",
                       key if key.isalnum() and len(key) <= 64 else "")


def _loopback(request: web.Request) -> str:
    """This server's own address: the page calls the API where it is served, not through a proxy."""
    host, port = request.transport.get_extra_info("sockname")[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def patient(request: web.Request, caller: Caller | None) -> web.Response:
    return render("patient.html", nav="patient", form=None, choices=None, history=None, message=None,
                  confirm=None, receipt=None, refused=None, scopes=_scopes())


def _scopes() -> list[tuple[str, str]]:
    return [(s, LABELS[s]) for s in values(OptOutScope)]


async def patient_act(request: web.Request, caller: Caller | None) -> web.Response:
    form = _patient_form(await _form(request, "page_patient_act"))
    written = confirm = receipt = refused = choices = history = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = PatientApi(session, _loopback(request), form.token)
        try:
            if form.action in ("opt-out", "opt-in", "withdraw") and not form.confirmed:
                # Say what will happen before it happens; the key makes a double click one write.
                confirm = secrets.token_hex(16)
            elif form.action == "withdraw":
                written = await api.withdraw_consent(form.nhs, form.grant_id, form.key or secrets.token_hex(16))
            elif form.action in ("opt-out", "opt-in"):
                written = await api.choose(form.nhs, form.action == "opt-out", form.scope,
                                           form.key or secrets.token_hex(16))
            elif form.action == "receipt":
                proof, text = await api.receipt(form.nhs, form.position)
                keys = await api.log_keys()
                receipt = {"proof": proof, "text": text, "origin": keys.origin, "vkeys": keys.keys,
                           "checks": check_receipt(text, [note.parse_vkey(k) for k in keys.keys], keys.origin)}
            choices = await api.choices(form.nhs)
            history = await api.history(form.nhs)
            # The history is a projection a moment behind the write: wait for it (bounded) as an app would.
            for _ in range(HISTORY_WAITS):
                if written is None or history.as_of >= written.position:
                    break
                await asyncio.sleep(0.1)
                history = await api.history(form.nhs)
        except ApiRefused as exc:
            refused = exc
    return render("patient.html", nav="patient", http_status=200 if refused is None else refused.status,
                  scopes=_scopes(), form=form, message=written, confirm=confirm, receipt=receipt,
                  refused=refused, choices=choices, history=history)


# --- API reference and files ---------------------------------------------------------------


async def docs(request: web.Request, caller: Caller | None) -> web.Response:
    document = msgspec.json.decode(request.app[OPENAPI])
    operations = [
        {"method": method.upper(), "path": path, **operation}
        for path, methods in document["paths"].items() for method, operation in methods.items()
    ]
    return render("docs.html", nav="docs", document=document, operations=operations,
                  schemas=document["components"]["schemas"])


async def static_asset(request: web.Request, caller: Caller | None) -> web.Response:
    return asset(request.match_info["asset"])


HANDLERS: dict[str, Handler] = {
    "page_home": home,
    "page_register": register,
    "page_grant": grant,
    "page_statistics": statistics_page,
    "page_transparency": transparency,
    "page_check_receipt": check_receipt_page,
    "page_patient": patient,
    "page_patient_act": patient_act,
    "page_docs": docs,
    "page_asset": static_asset,
}
