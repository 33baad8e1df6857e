"""A fixed list of replicas, and the parser for the ``URL[,kind=…][,group=…]`` strings that name them.

The URL helpers here are shared by every discovery mode, so that a replica found by DNS or in an
EndpointSlice gets exactly the URL an operator would have written by hand: the registry keys replicas
by URL, and one replica must never appear under two spellings.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from router.discovery.base import REPLICA_KINDS, Discovery, ReplicaKind, ReplicaSpec

_SCHEMES = ("http", "https")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_DOTTED_DIGITS = re.compile(r"^[0-9.]+$")
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def replica_url(scheme: str, host: str, port: int) -> str:
    """The canonical base URL of a replica at ``host:port``; IPv6 literals are bracketed."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{scheme}://{host.lower()}:{port}"
    return f"{scheme}://[{ip.compressed}]:{port}" if ip.version == 6 else f"{scheme}://{ip}:{port}"


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def sorted_specs(specs: Iterable[ReplicaSpec]) -> list[ReplicaSpec]:
    """Deduplicated by URL (the first spec of a URL wins) and sorted by URL, so equal sets compare equal."""
    by_url: dict[str, ReplicaSpec] = {}
    for spec in specs:
        by_url.setdefault(spec.url, spec)
    return [by_url[url] for url in sorted(by_url)]


def validate_kind(kind: str) -> ReplicaKind:
    if kind not in REPLICA_KINDS:
        raise ValueError(f"unknown replica kind {kind!r}: expected one of {', '.join(REPLICA_KINDS)}")
    return kind


def validate_group(group: str) -> str:
    if not _GROUP.match(group):
        raise ValueError(f"invalid replica group {group!r}: expected 1-63 of [A-Za-z0-9._-], starting alphanumeric")
    return group


def validate_hostname(hostname: str) -> str:
    if not _HOSTNAME.match(hostname.lower()):
        raise ValueError(f"invalid host name {hostname!r}")
    return hostname


def validate_scheme(scheme: str) -> str:
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}: expected http or https")
    return scheme


def validate_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 1-65535")
    return port


def normalize_url(text: str) -> str:
    """Validate a replica base URL and return its canonical spelling (lower-case scheme and host, no trailing slash).

    The port may be left out (the scheme's default is meant); a path is kept as a prefix, for replicas
    behind a path-routing proxy. Credentials, queries and fragments are refused: they would leak into
    logs and metrics labels, or be silently dropped when the router appends ``/v1/...``.
    """
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as e:
        raise ValueError(f"invalid replica URL {text!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not parts.netloc:
        raise ValueError(f"invalid replica URL {text!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid replica URL {text!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"invalid replica URL {text!r}: a query or fragment is not allowed")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"invalid replica URL {text!r}: missing host")
    if parts.netloc.rsplit("@", 1)[-1].startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"invalid replica URL {text!r}: {host!r} is not an IPv6 address") from None
    elif not _HOSTNAME.match(host) or (_DOTTED_DIGITS.match(host) and not _is_ipv4(host)):
        raise ValueError(f"invalid replica URL {text!r}: {host!r} is not a valid host name or IPv4 address")
    if port == 0:
        raise ValueError(f"invalid replica URL {text!r}: port 0 (expected 1-65535)")
    if parts.netloc.endswith(":") and port is None:
        raise ValueError(f"invalid replica URL {text!r}: empty port")
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def parse_replica_arg(text: str, default_kind: ReplicaKind = "vllm", default_group: str = "default") -> ReplicaSpec:
    """Parse ``URL`` or ``URL,kind=sglang,group=prefill`` (a ``--replica`` flag or a YAML list entry)."""
    url_text, *options = text.split(",")
    kind: str = default_kind
    group = default_group
    seen: set[str] = set()
    for option in options:
        key, sep, value = (s.strip() for s in option.partition("="))
        if not sep or not key:
            raise ValueError(f"invalid replica option {option.strip()!r} in {text!r}: expected key=value")
        if key in seen:
            raise ValueError(f"replica option {key!r} given twice in {text!r}")
        seen.add(key)
        if key == "kind":
            kind = value
        elif key == "group":
            group = value
        else:
            raise ValueError(f"unknown replica option {key!r} in {text!r}: expected kind or group")
    return ReplicaSpec(url=normalize_url(url_text), kind=validate_kind(kind), group=validate_group(group))


class StaticDiscovery(Discovery):
    """A fixed fleet: the set is announced once and never changes."""

    def __init__(self, specs: Iterable[ReplicaSpec]) -> None:
        self.specs = list(specs)
        duplicates = sorted(url for url, n in Counter(s.url for s in self.specs).items() if n > 1)
        if duplicates:
            # Two entries for one replica would double its share of traffic; that is a config mistake.
            raise ValueError(f"replica listed more than once: {', '.join(duplicates)}")

    async def run(self, on_update: Callable[[list[ReplicaSpec]], None]) -> None:
        on_update(list(self.specs))
        await asyncio.Event().wait()  # nothing more to say; wait to be cancelled
