"""Structured logging: structlog with contextvars and a JSON renderer.

Nothing logged may contain an NHS number; the handlers never log one, and
the last processor masks any 10-digit run as a second line of defence.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus

import msgspec
import structlog

_TEN_DIGITS = re.compile(r"(?<![0-9A-Za-z])\d{3}[ -]?\d{3}[ -]?\d{4}(?![0-9A-Za-z])")


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        masked = _TEN_DIGITS.sub("[nhs-number?]", value)
        # A raw request line keeps its percent-encoding ("943%20476%205927", "943+476+5927"):
        # look again at the decoded text, and log that, masked, if it hides a number.
        if "%" in masked or "+" in masked:
            decoded = unquote_plus(masked)
            if _TEN_DIGITS.search(decoded):
                return _TEN_DIGITS.sub("[nhs-number?]", decoded)
        return masked
    return value


def redact_nhs_numbers(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: _mask(v) for k, v in event_dict.items()}


def _serialise(obj: Any, **_: Any) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def _serialise_text(obj: Any, **_: Any) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


def _route_stdlib_logging(level: int, fmt: str) -> None:
    """Libraries log through the standard library (aiohttp logs the raw bytes
    of malformed requests, which can hold an NHS number in the path): send
    those records through the same masking and renderer."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_serialise_text)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_nhs_numbers,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries are chatty at INFO (pgserver echoes initdb); their warnings and errors are what matter.
    root.setLevel(max(level, logging.WARNING))


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory: Any = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_serialise)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    _route_stdlib_logging(getattr(logging, level.upper(), logging.INFO), fmt)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_nhs_numbers,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
