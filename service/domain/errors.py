"""What the domain refuses, as exceptions the HTTP layer maps to problems."""

from __future__ import annotations


class RuleBroken(Exception):
    """A well-formed request that the domain refuses (HTTP 422)."""

    def __init__(self, detail: str, *, code: str = "rule-broken", path: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.path = path


class NotPermitted(Exception):
    """The caller may not act on this (another organisation's grant): HTTP 403."""


class NotFound(Exception):
    pass


class AlreadyExists(Exception):
    pass
