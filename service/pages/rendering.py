"""Templates (Jinja2, autoescaped) and the static files the pages use.

Every page is rendered here, so every page carries the same headers: a
Content-Security-Policy that allows only this origin's own stylesheets,
scripts and images (no inline script or style, no CDN, no framing)."""

from __future__ import annotations

import mimetypes
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from contracts.codes import LABELS
from contracts.disclosure import shown, suppressed

STATIC = Path(__file__).parent / "static"

PAGE_POLICY = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; "
               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# Everything that is not a page (JSON, text, tiles) may not run or embed anything.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def _when(value: str | datetime | None) -> str:
    if value is None:
        return ""
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.strftime("%-d %B %Y, %H:%M UTC")


def _day(value: str | None) -> str:
    return "" if value is None else datetime.fromisoformat(value).strftime("%-d %B %Y")


ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("service.pages", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENVIRONMENT.filters.update(
    when=_when,
    day=_day,
    number=lambda n: f"{n:,}",
    patients=shown,
    suppress=suppressed,
    label=lambda code: LABELS.get(code, code),
)


def render(template: str, *, http_status: int = 200, **context: Any) -> web.Response:
    html = ENVIRONMENT.get_template(template).render(**context)
    return web.Response(text=html, status=http_status, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def asset(path: str) -> web.Response:
    """A file under static/, or 404; never anything outside it."""
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
        raise web.HTTPNotFound()
    kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return web.Response(body=target.read_bytes(), content_type=kind,
                        headers={"Cache-Control": "public, max-age=3600"})
