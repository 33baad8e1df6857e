"""Replicas from a Service's EndpointSlices, listed then watched through the Kubernetes API.

Unlike DNS, the API says why an endpoint is there: readiness and termination are explicit, so a pod
leaves the set as soon as it starts draining, and an empty set is the truth rather than an outage. So
an empty set the API reports is announced, while errors (API server unreachable, token rejected) never
change the set: the last known one stays until the API answers again.

The client follows the list-then-watch protocol of client-go's reflector: list to get a consistent
snapshot and its ``resourceVersion``, watch from there, resume the watch from the last version seen
when the server ends it, and re-list when that version has expired (410 Gone) or the connection broke.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from router.discovery.base import Discovery, ReplicaKind, ReplicaSpec
from router.discovery.static import (
    normalize_url,
    replica_url,
    sorted_specs,
    validate_group,
    validate_hostname,
    validate_kind,
    validate_scheme,
)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_USER_AGENT = "fleetroute-discovery"
#: Preference among the addresses of one dual-stack pod: it must count as one replica, not two.
_FAMILY_RANK = {"IPv4": 0, "IPv6": 1, "FQDN": 2}
_MAX_EVENT_BYTES = 16 * 1024 * 1024


class ApiError(Exception):
    """The API server answered with an error status (or an ERROR watch event)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after_s = retry_after_s


class _Malformed(Exception):
    """The API server sent something that is not the JSON we asked for."""


class _Expired(Exception):
    """The resourceVersion the watch started from is no longer available (410 Gone): re-list."""


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is uniform in [d/2, d], d = initial·2ⁿ, capped.

    The jitter spreads the reconnects of many routers after an API server restart; the lower bound
    keeps a single router from retrying in a hot loop.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial backoff ({initial_s}) <= max backoff ({max_s})")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._failures = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self._failures, 64))
        self._failures += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


@dataclass(frozen=True, slots=True)
class _Endpoint:
    target: str | None  # the pod behind the address, when the slice says so
    family_rank: int
    spec: ReplicaSpec


def _pick_port(ports: Any, port_name: str | None) -> int | None:
    if not isinstance(ports, list):
        return None
    for port in ports:
        if not isinstance(port, dict) or not isinstance(port.get("port"), int):
            continue
        if port_name is not None:
            if (port.get("name") or "") == port_name:
                return int(port["port"])
        elif (port.get("protocol") or "TCP") == "TCP":
            return int(port["port"])
    return None


def _metadata(obj: Any, key: str) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def _slice_name(obj: Any) -> str | None:
    return _metadata(obj, "name")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise _Malformed(f"invalid JSON from the API server: {e}") from None


def _slice_endpoints(obj: Any, port_name: str | None, scheme: str, kind: ReplicaKind, group: str) -> list[_Endpoint]:
    """The ready, non-terminating endpoints of one EndpointSlice, as replicas on the chosen port."""
    if not isinstance(obj, dict):
        return []
    name = _slice_name(obj)
    family = obj.get("addressType")
    if family not in _FAMILY_RANK:
        log.warning("EndpointSlice %s: unsupported addressType %r, ignored", name, family)
        return []
    endpoints = obj.get("endpoints") or []
    port = _pick_port(obj.get("ports"), port_name)
    if port is None:
        if endpoints:
            names = [p.get("name") or "" for p in obj.get("ports") or [] if isinstance(p, dict)]
            wanted = f"port named {port_name!r}" if port_name is not None else "TCP port"
            log.warning("EndpointSlice %s has no %s (ports: %s); its endpoints are ignored", name, wanted, names)
        return []
    out = []
    for ep in endpoints:
        if not isinstance(ep, dict):
            continue
        conditions = ep.get("conditions") or {}
        # Per the API: a missing "ready" means ready, a missing "terminating" means not terminating.
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        addresses = ep.get("addresses") or []
        # The API defines no meaning for addresses beyond the first (kube-proxy ignores them too).
        if not addresses or not isinstance(addresses[0], str):
            continue
        host = addresses[0]
        if family == "FQDN":
            try:
                validate_hostname(host)
            except ValueError:
                log.warning("EndpointSlice %s: ignoring invalid FQDN address %r", name, host)
                continue
        ref = ep.get("targetRef")
        target = None
        if isinstance(ref, dict) and ref.get("name"):
            target = f"{ref.get('kind')}/{ref.get('namespace')}/{ref.get('name')}"
        try:
            url = replica_url(scheme, host, port)
        except ValueError:
            continue
        out.append(_Endpoint(target, _FAMILY_RANK[family], ReplicaSpec(url, kind, group)))
    return out


def _combine(endpoint_lists: Iterable[Iterable[_Endpoint]]) -> list[ReplicaSpec]:
    """One replica per pod (IPv4 preferred for dual-stack pods), one per address otherwise; sorted."""
    by_target: dict[str, _Endpoint] = {}
    others: list[ReplicaSpec] = []
    for endpoints in endpoint_lists:
        for ep in endpoints:
            if ep.target is None:
                others.append(ep.spec)
                continue
            held = by_target.get(ep.target)
            if held is None or (ep.family_rank, ep.spec.url) < (held.family_rank, held.spec.url):
                by_target[ep.target] = ep
    return sorted_specs([*others, *(ep.spec for ep in by_target.values())])


def replicas_from_slices(
    slices: Iterable[Mapping[str, Any]],
    port_name: str | None = None,
    scheme: str = "http",
    kind: ReplicaKind = "vllm",
    group: str = "default",
) -> list[ReplicaSpec]:
    """The replica set described by all EndpointSlices of a Service (pure; what the watcher announces)."""
    return _combine(_slice_endpoints(obj, port_name, scheme, kind, group) for obj in slices)


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited records of a streamed body; a watch event can exceed aiohttp's readline limit."""
    buf = b""
    async for chunk in stream.iter_any():
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield line
        if len(buf) > _MAX_EVENT_BYTES:
            raise _Malformed(f"watch event larger than {_MAX_EVENT_BYTES} bytes")
    if buf.strip():
        yield buf


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _status_message(body: bytes) -> str:
    """The message of a ``Status`` error body, or the start of the body if it is not one."""
    try:
        status = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip() or "(empty body)"
    message = status.get("message") if isinstance(status, dict) else None
    return str(message) if message else body[:200].decode(errors="replace")


class _Token:
    """The service-account token, re-read periodically: projected tokens rotate (hourly by default)."""

    def __init__(self, path: str, refresh_s: float) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._value: str | None = None
        self._read_at: float | None = None
        self._missing_logged = False

    def invalidate(self) -> None:
        self._read_at = None

    def headers(self) -> dict[str, str]:
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._read_at = now
            try:
                self._value = Path(self.path).read_text().strip() or None
            except OSError as e:
                if not self._missing_logged:
                    log.warning("cannot read the service-account token (%s); calling the API without one", e)
                    self._missing_logged = True
                self._value = None
            else:
                self._missing_logged = False
        return {"Authorization": f"Bearer {self._value}"} if self._value else {}


class KubernetesDiscovery(Discovery):
    """Lists and watches the EndpointSlices of one Service and announces its ready endpoints.

    Runs with the pod's service account (in-cluster config); ``api_server`` overrides the address,
    and only an explicit override may use plain http. Needs get/list/watch on
    ``endpointslices.discovery.k8s.io`` in ``namespace``.
    """

    def __init__(
        self,
        service: str,
        namespace: str | None = None,
        port_name: str | None = None,
        kind: ReplicaKind = "vllm",
        group: str = "default",
        api_server: str | None = None,
        token_path: str = f"{SERVICE_ACCOUNT_DIR}/token",
        ca_path: str = f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        namespace_path: str = f"{SERVICE_ACCOUNT_DIR}/namespace",
        *,
        scheme: str = "http",
        token_refresh_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        watch_timeout_s: float = 300.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        if not _DNS_LABEL.match(service):
            raise ValueError(f"invalid Service name {service!r}")
        self.service = service
        self.namespace = namespace or self._namespace_from(namespace_path)
        if not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"invalid namespace {self.namespace!r}")
        if port_name is not None and not port_name:
            raise ValueError("port name must not be empty (leave it unset to use the first port)")
        self.port_name = port_name
        self.kind = validate_kind(kind)
        self.group = validate_group(group)
        self.scheme = validate_scheme(scheme)
        self.api_server = normalize_url(api_server) if api_server is not None else self._in_cluster_api_server()
        self.ca_path = ca_path
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self._token = _Token(token_path, token_refresh_s)
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._url = f"{self.api_server}/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        self._slices: dict[str, list[_Endpoint]] = {}
        self._slices_changed_since_list = False
        self._known: list[ReplicaSpec] | None = None
        self._on_update: Callable[[list[ReplicaSpec]], None] = lambda specs: None

    @staticmethod
    def _namespace_from(path: str) -> str:
        try:
            return Path(path).read_text().strip() or "default"
        except OSError:
            return "default"

    @staticmethod
    def _in_cluster_api_server() -> str:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError(
                "KUBERNETES_SERVICE_HOST is not set: not running in a pod? Give the API server address explicitly"
            )
        if not port.isdigit():
            raise RuntimeError(f"KUBERNETES_SERVICE_PORT is not a port number: {port!r}")
        return replica_url("https", host, int(port))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.api_server.startswith("https:"):
            return None
        if os.path.exists(self.ca_path):
            return ssl.create_default_context(cafile=self.ca_path)
        log.warning("no CA bundle at %s; verifying the API server against the system trust store", self.ca_path)
        return ssl.create_default_context()

    @property
    def _where(self) -> str:
        return f"EndpointSlices of {self.namespace}/{self.service}"

    async def run(self, on_update: Callable[[list[ReplicaSpec]], None]) -> None:
        self._on_update = on_update
        self._known = None
        self._backoff.reset()
        connector = aiohttp.TCPConnector(ssl=self._ssl_context() or True)
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            while True:
                try:
                    version = await self._list(session)
                    while True:
                        version = await self._watch(session, version)
                except _Expired as e:
                    log.info("%s: watch expired (%s); re-listing", self._where, e)
                    if not self._slices_changed_since_list:
                        # Expired right after a list: do not let a confused server drive a hot loop.
                        await asyncio.sleep(self._backoff.next())
                except (aiohttp.ClientError, TimeoutError, ApiError, _Malformed) as e:
                    delay = self._backoff.next()
                    if isinstance(e, ApiError) and e.retry_after_s is not None:
                        delay = max(delay, e.retry_after_s)
                    log.warning(
                        "%s: %s; keeping the last %s replicas, re-listing in %.2fs",
                        self._where,
                        self._describe(e),
                        len(self._known) if self._known is not None else "(no)",
                        delay,
                    )
                    await asyncio.sleep(delay)

    def _describe(self, e: Exception) -> str:
        if isinstance(e, ApiError) and e.status == 401:
            return f"{e} (token rejected; re-reading {self._token.path})"
        if isinstance(e, ApiError) and e.status == 403:
            return f"{e} (the service account needs get/list/watch on endpointslices.discovery.k8s.io)"
        if isinstance(e, ApiError) and e.status == 404:
            return f"{e} (discovery.k8s.io/v1 needs Kubernetes >= 1.21)"
        return str(e) if isinstance(e, (ApiError, _Malformed)) else f"{type(e).__name__}: {e}"

    async def _check(self, resp: aiohttp.ClientResponse, watching: bool) -> None:
        if resp.status == 200:
            return
        message = _status_message(await resp.read())
        if resp.status == 401:
            self._token.invalidate()  # maybe rotated under us: read it again before the next call
        if resp.status == 410 and watching:
            raise _Expired(message)
        raise ApiError(resp.status, message, _retry_after(resp))

    async def _list(self, session: aiohttp.ClientSession) -> str:
        """Replace the state with a fresh snapshot; return the version to watch from."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        params = {"labelSelector": self._selector}
        async with session.get(self._url, params=params, headers=self._token.headers(), timeout=timeout) as resp:
            await self._check(resp, watching=False)
            body = _json(await resp.read())
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise _Malformed("malformed EndpointSliceList: no items")
        version = _metadata(body, "resourceVersion")
        if version is None:
            raise _Malformed("malformed EndpointSliceList: no metadata.resourceVersion")
        slices = {}
        for obj in body["items"]:
            name = _slice_name(obj)
            if name is not None:
                slices[name] = self._endpoints(obj)
        self._slices = slices
        self._slices_changed_since_list = False
        log.debug("%s: listed %d slices at version %s", self._where, len(slices), version)
        self._publish()
        return version

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> str:
        """Apply the events of one watch request; return the last version seen when the server ends it."""
        params = {
            "labelSelector": self._selector,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, round(self.watch_timeout_s))),
        }
        # The server ends the watch after timeoutSeconds; a read timeout beyond that catches dead peers.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.request_timeout_s, sock_read=self.watch_timeout_s + self.request_timeout_s
        )
        delivered = False
        async with session.get(self._url, params=params, headers=self._token.headers(), timeout=timeout) as resp:
            await self._check(resp, watching=True)
            async for line in _lines(resp.content):
                version = self._apply(_json(line), version)
                if not delivered:
                    delivered = True
                    self._backoff.reset()  # the API is healthy again
        if not delivered:
            # A normal watch ends after timeoutSeconds with at least a bookmark; an empty one that ends
            # at once is a proxy or server problem, so pace the retries.
            await asyncio.sleep(self._backoff.next())
        return version

    def _apply(self, event: Any, version: str) -> str:
        """Apply one watch event to the state; return the resourceVersion it brings us to."""
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _Malformed(f"malformed watch event: {str(event)[:200]}")
        if kind == "ERROR":
            code = obj.get("code")
            message = str(obj.get("message") or obj.get("reason") or "watch error")
            if code == 410:
                raise _Expired(message)
            raise ApiError(code if isinstance(code, int) else 500, message)
        version = _metadata(obj, "resourceVersion") or version
        if kind == "BOOKMARK":
            return version
        name = _slice_name(obj)
        if name is None:
            log.warning("%s: watch event %s without a slice name, ignored", self._where, kind)
            return version
        if kind in ("ADDED", "MODIFIED"):
            self._slices[name] = self._endpoints(obj)
        elif kind == "DELETED":
            self._slices.pop(name, None)
        else:
            log.debug("%s: ignoring watch event of type %r", self._where, kind)
            return version
        self._slices_changed_since_list = True
        self._publish()
        return version

    def _endpoints(self, obj: Any) -> list[_Endpoint]:
        return _slice_endpoints(obj, self.port_name, self.scheme, self.kind, self.group)

    def _publish(self) -> None:
        specs = _combine(self._slices.values())
        if specs == self._known:
            return
        before = {s.url for s in self._known or []}
        after = {s.url for s in specs}
        log.info(
            "%s: %d ready replicas (added %s, removed %s)",
            self._where,
            len(specs),
            sorted(after - before),
            sorted(before - after),
        )
        self._known = specs
        self._on_update(list(specs))
