"""Why a bulk body of NHS numbers did not parse, when its media type is the likely mistake.

A MESH ``.dat`` file sent as ``text/plain`` (every line ends with a comma),
text lines sent as ``.dat`` (no commas), or JSON sent as either, otherwise
reads as "every line is an invalid NHS number" with nothing pointing at the
Content-Type.  Only called on the error path, and only looks at the start
of the body.
"""

from __future__ import annotations

from contracts.bulk import DAT, TEXT

JSON = "application/json"
_LOOK = 4096  # bytes looked at: enough lines to tell, cheap on a 60 MB body


def likely_mistake(content_type: str, body: bytes | bytearray) -> str | None:
    """What to change, in words for the problem's detail; None when the body fits its media type."""
    start = bytes(body[:_LOOK])
    lines = start.split(b"\n")
    if len(body) > _LOOK:
        lines.pop()  # cut short here
    lines = [line.strip() for line in lines if line.strip()]
    json_like = start.lstrip()[:1] in (b"[", b"{")
    commas = sum(line.endswith(b",") for line in lines)
    if content_type in (TEXT, DAT) and json_like:
        return "the body looks like JSON: send it with Content-Type: application/json"
    if content_type == TEXT and lines and commas == len(lines):
        return ("every line ends with a comma, as in a MESH .dat file: send it with Content-Type: "
                f"{DAT} (text/plain is one NHS number per line, without commas)")
    if content_type == DAT and lines and commas == 0:
        return ("no line ends with a comma, as in text/plain: send it with Content-Type: text/plain "
                f"({DAT} is one NHS number per line, each followed by a comma)")
    if content_type == JSON and lines and not json_like:
        kind = DAT if commas == len(lines) else TEXT
        return f"the body looks like lines of NHS numbers, not JSON: send it with Content-Type: {kind}"
    return None
