"""The patient page's only way to the ledger: the public HTTP API, with the
token the person typed in, exactly as a patient app's backend would call it.

App developers can copy this (and templates/patient.html): nothing here
reaches past the API, so the roles, the patient rule, recorded reads and
idempotent writes all apply as they would to their app."""

from __future__ import annotations

from typing import Any, TypeVar

import aiohttp
import msgspec

from contracts import bodies

T = TypeVar("T")


class ApiRefused(Exception):
    """The API answered with a problem: its status, title and what to do."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


class PatientApi:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str):
        self._session, self._base = session, base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, kind: type[T], *, json: Any = None,
                    idempotency_key: str | None = None) -> tuple[T, bytes]:
        headers = dict(self._headers)
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        async with self._session.request(method, self._base + path, json=json, headers=headers) as response:
            raw = await response.read()
            if response.status >= 400:
                try:
                    problem = msgspec.json.decode(raw, type=bodies.Problem)
                    raise ApiRefused(response.status, problem.title, problem.detail or problem.title)
                except msgspec.DecodeError:
                    raise ApiRefused(response.status, response.reason or "refused", raw[:200].decode(errors="replace")) \
                        from None
        return msgspec.json.decode(raw, type=kind), raw

    async def whoami(self) -> bodies.TokenInfo:
        return (await self._call("GET", "/v1/whoami", bodies.TokenInfo))[0]

    async def choices(self, nhs: str) -> bodies.Choices:
        return (await self._call("GET", f"/v1/patients/{nhs}/choices", bodies.Choices))[0]

    async def history(self, nhs: str, limit: int = 50) -> bodies.HistoryPage:
        return (await self._call("GET", f"/v1/patients/{nhs}/history?limit={limit}", bodies.HistoryPage))[0]

    async def choose(self, nhs: str, opting_out: bool, scope: str, idempotency_key: str) -> bodies.Receipt:
        body = {"scope": scope, "channel": "online", "actor": {"kind": "patient"}}
        path = f"/v1/patients/{nhs}/{'opt-out' if opting_out else 'opt-in'}"
        return (await self._call("POST", path, bodies.Receipt, json=body, idempotency_key=idempotency_key))[0]

    async def withdraw_consent(self, nhs: str, grant_id: str, idempotency_key: str) -> bodies.Receipt:
        return (await self._call("DELETE", f"/v1/patients/{nhs}/consents/{grant_id}", bodies.Receipt,
                                 idempotency_key=idempotency_key))[0]

    async def receipt(self, nhs: str, position: int) -> tuple[bodies.ReceiptProof, str]:
        proof, raw = await self._call("GET", f"/v1/patients/{nhs}/receipts/{position}", bodies.ReceiptProof)
        return proof, raw.decode()

    async def log_keys(self) -> bodies.LogKeys:
        return (await self._call("GET", "/v1/log-key", bodies.LogKeys))[0]
