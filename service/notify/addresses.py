"""Where a webhook may be sent: never, by default, to this service's own
network (private, loopback, link-local, multicast or reserved addresses),
which a subscriber could otherwise use to reach internal systems (SSRF).

Checked when a subscription is made and on every delivery, for the URL's
literal address or every address its name resolves to, and again by the
resolver the delivery connects through, so a name that resolves to a public
address when checked and a private one when connecting is refused too."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

RESOLVE_SECONDS = 5.0


class AddressRefused(ValueError):
    """A webhook URL this service will not send to; the message says why."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(allowed: tuple[str, ...]) -> list[Network]:
    return [ipaddress.ip_network(n) for n in allowed]


def check_ip(host: str, address: str, allowed: list[Network]) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if any(ip in n for n in allowed):
        return
    if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved \
            or ip.is_unspecified:
        raise AddressRefused(f"{host} is {ip}, a private, loopback or link-local address: webhooks go only to "
                             "public addresses (an operator may allow networks with CONSENT_LEDGER_WEBHOOK_ALLOW)")


async def check_url(url: str, allowed: list[Network], *, resolve: bool = True) -> None:
    """Refuse a URL that is not http(s) to a host whose every address is allowed. ``resolve=False``
    checks a literal address only: for a connection made through ``GuardedResolver``, which checks
    every address a name resolves to as it connects."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise AddressRefused("the URL cannot be read (its port?)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressRefused("the URL must be http:// or https:// with a host name")
    if parts.username or parts.password:
        raise AddressRefused("the URL must not carry a user name or password")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_ip(host, str(literal), allowed)
        return
    if not resolve:
        return
    try:
        found = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_SECONDS)
    except (OSError, asyncio.TimeoutError, UnicodeError, ValueError):  # a name too long for IDNA is a ValueError
        raise AddressRefused(f"the host {host} cannot be resolved") from None
    for *_, address in found:
        check_ip(host, address[0], allowed)


class GuardedResolver(AbstractResolver):
    """The resolver deliveries connect through: refuses any address ``check_ip`` refuses."""

    def __init__(self, allowed: list[Network]):
        self._inner, self._allowed = ThreadedResolver(), allowed

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            try:
                check_ip(host, entry["host"], self._allowed)
            except AddressRefused as exc:
                raise OSError(str(exc)) from None
        return found

    async def close(self) -> None:
        await self._inner.close()
