"""Replicas behind a headless Service, found by resolving its name periodically.

A headless Service's name resolves to one A (or AAAA) record per ready pod, so polling it needs no API
access. DNS cannot tell an outage from an empty fleet, so any failure, an authoritative "no such name"
included, keeps the last known set: a replica that really went away is then the health checker's job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

from router.discovery.base import Discovery, ReplicaKind, ReplicaSpec
from router.discovery.static import (
    replica_url,
    sorted_specs,
    validate_group,
    validate_hostname,
    validate_kind,
    validate_port,
    validate_scheme,
)

log = logging.getLogger(__name__)

#: Resolves ``(hostname, port)`` to IP address strings. Raises :class:`OSError` on failure; a
#: :class:`socket.gaierror` with ``EAI_NONAME``/``EAI_NODATA`` (or an empty result) means "no records".
Resolver = Callable[[str, int], Awaitable[Iterable[str]]]

_NO_RECORDS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def system_resolver(hostname: str, port: int) -> list[str]:
    """A and AAAA records through the system resolver (``getaddrinfo``, so /etc/hosts and search domains apply)."""
    infos = await asyncio.get_running_loop().getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


class DnsDiscovery(Discovery):
    """Polls a name every ``interval_s`` and announces the sorted set of ``scheme://ip:port`` when it changes.

    ``address_family`` keeps only IPv4 or IPv6 records: a dual-stack headless Service returns both for
    every pod, and DNS cannot pair them, so each pod would otherwise count as two replicas.
    """

    def __init__(
        self,
        hostname: str,
        port: int,
        scheme: str = "http",
        kind: ReplicaKind = "vllm",
        group: str = "default",
        interval_s: float = 10.0,
        resolver: Resolver | None = None,
        address_family: Literal["ipv4", "ipv6"] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"DNS interval must be positive, got {interval_s}")
        self.hostname = validate_hostname(hostname)
        self.port = validate_port(port)
        self.scheme = validate_scheme(scheme)
        self.kind = validate_kind(kind)
        self.group = validate_group(group)
        self.interval_s = interval_s
        self.address_family = address_family
        self._ip_version = {None: None, "ipv4": 4, "ipv6": 6}[address_family]
        self._resolver = resolver or system_resolver

    async def run(self, on_update: Callable[[list[ReplicaSpec]], None]) -> None:
        known: list[ReplicaSpec] | None = None
        failing = False
        while True:
            try:
                specs = self._specs(await self._resolver(self.hostname, self.port))
            except OSError as e:
                no_records = isinstance(e, socket.gaierror) and e.errno in _NO_RECORDS
                self._log_failure(known, f"no records ({e})" if no_records else f"resolution failed ({e})", no_records)
                failing = True
            else:
                if not specs:
                    self._log_failure(known, "no usable A/AAAA records", True)
                    failing = True
                else:
                    if failing:
                        log.info("DNS name %s resolves again", self.hostname)
                        failing = False
                    if specs != known:
                        log.info("DNS name %s: %d replicas: %s", self.hostname, len(specs), [s.url for s in specs])
                        known = specs
                        on_update(list(specs))
            await asyncio.sleep(self.interval_s)

    def _specs(self, addresses: Iterable[str]) -> list[ReplicaSpec]:
        specs = []
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                log.warning("DNS name %s: ignoring %r, not an IP address", self.hostname, address)
                continue
            if self._ip_version is not None and ip.version != self._ip_version:
                continue
            specs.append(ReplicaSpec(replica_url(self.scheme, str(ip), self.port), self.kind, self.group))
        return sorted_specs(specs)

    def _log_failure(self, known: list[ReplicaSpec] | None, what: str, no_records: bool) -> None:
        if known is None:
            log.warning("DNS name %s: %s; no replicas yet, retrying in %gs", self.hostname, what, self.interval_s)
        elif no_records:
            # Authoritative, but a Service normally still resolves with zero pods: more likely a deleted
            # Service or a DNS misconfiguration than a fleet that really scaled to zero. Say so loudly.
            log.error(
                "DNS name %s: %s after having %d replicas; keeping them (the health checker ejects dead ones), "
                "retrying in %gs",
                self.hostname,
                what,
                len(known),
                self.interval_s,
            )
        else:
            log.warning(
                "DNS name %s: %s; keeping the last %d replicas, retrying in %gs",
                self.hostname,
                what,
                len(known),
                self.interval_s,
            )
