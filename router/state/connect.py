"""A redis-py asyncio client from one URL, whatever the deployment: a single server, Sentinel, or Cluster.

redis-py's own ``from_url`` covers ``redis://``, ``rediss://`` (TLS) and ``unix://``, with the password, user
and TLS options in the URL. Two more schemes name the topologies it supports through other classes:

* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` (``rediss+sentinel://`` for
  TLS): the master of ``service`` as the sentinels report it, following failovers. The password is the
  master's; ``?sentinel_password=`` sets the sentinels' own.
* ``redis+cluster://[[user]:password@]host[:port]`` (``rediss+cluster://``): a Redis Cluster from any seed node.
  Every key of a fleet carries the hash tag ``{fleet}``, so a fleet's keys share one slot and multi-key
  commands and transactions work.

Retries are left to the store, which reconnects with backoff and resynchronises: redis-py's own retry would
only hide an outage behind seconds of blocked commands. No ``socket_timeout`` either: with one, redis-py sends
through ``asyncio.wait_for``, which on Python 3.11 can swallow a task's cancellation (the store could then
never be stopped); the store bounds every operation with ``asyncio.timeout`` instead.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

__all__ = ["RedisClient", "client_from_url", "redact_url", "validate_redis_url"]

RedisClient = Redis | RedisCluster
_DEFAULT_SENTINEL_PORT = 26379


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _scheme(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ValueError(f"a Redis URL starts with one of {', '.join(s + '://' for s in _SCHEMES)}")
    return scheme, rest


_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


def validate_redis_url(url: str) -> None:
    """Raise ``ValueError`` if ``url`` cannot name a Redis deployment (checked at startup; nothing connects)."""
    scheme, rest = _scheme(url)
    if scheme.endswith("+sentinel"):
        _parse_sentinel(rest)


def client_from_url(url: str, *, connect_timeout_s: float = 2.0) -> RedisClient:
    """Build (do not connect) a client; ``connect_timeout_s`` bounds opening a connection."""
    options: dict[str, Any] = {
        "socket_timeout": None,  # explicitly: redis-py 8 defaults to 5 s, and to asyncio.wait_for (see above)
        "socket_connect_timeout": connect_timeout_s,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
    }
    scheme, rest = _scheme(url)
    if scheme.endswith("+sentinel"):
        return _sentinel_client(scheme.startswith("rediss"), rest, options)
    if scheme.endswith("+cluster"):
        base = "rediss" if scheme.startswith("rediss") else "redis"
        options.pop("retry")  # the cluster client retries on slot moves; its retry type differs
        return RedisCluster.from_url(f"{base}://{rest}", **options)
    return Redis.from_url(url, **options)


def _parse_sentinel(rest: str) -> tuple[list[tuple[str, int]], str, str, str, dict[str, list[str]]]:
    """Sentinel addresses, user info, service, db and query of a ``redis+sentinel://`` URL's remainder."""
    rest, _, query = rest.partition("?")
    userinfo, _, hosts = rest.rpartition("@")
    hosts, _, path = hosts.partition("/")
    service, _, db = path.partition("/")
    if not hosts or not service:
        raise ValueError("a sentinel URL names its sentinels and service: redis+sentinel://host:26379/mymaster")
    if db and not db.isdigit():
        raise ValueError(f"the database of a sentinel URL is a number, not {db!r}")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or not port.isdigit() or host.endswith(":"):  # no port (or a bare IPv6 address)
            host, port = item, ""
        sentinels.append((host.strip("[]"), int(port) if port else _DEFAULT_SENTINEL_PORT))
    return sentinels, userinfo, unquote(service), db, parse_qs(query)


def _sentinel_client(tls: bool, rest: str, options: dict[str, Any]) -> Redis:
    sentinels, userinfo, service, db, params = _parse_sentinel(rest)
    master: dict[str, Any] = dict(options)
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            master["username"] = unquote(user)
        if password:
            master["password"] = unquote(password)
    if db:
        master["db"] = int(db)
    if tls:
        master["ssl"] = True
    sentinel_options: dict[str, Any] = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    if "sentinel_password" in params:
        sentinel_options["password"] = params["sentinel_password"][0]
    if tls:
        sentinel_options["ssl"] = True
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options, **master)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(service)
    return client
