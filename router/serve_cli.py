"""``fleetroute serve``: the router. Flags override ``FLEETROUTE_*`` variables, which override ``--config``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from emulator.cli import loop_factory
from policies.routing import available_routing_policies
from router.config import ConfigError, load_settings
from router.logs import configure_logging


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--host", help="address to serve the OpenAI API on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port of the OpenAI API (default 8080)")
    parser.add_argument("--admin-host", help="address of the admin API (default 127.0.0.1)")
    parser.add_argument("--admin-port", type=int, help="port of the admin API (default 8081)")
    parser.add_argument("--admin-token", help="bearer token the admin API requires")
    parser.add_argument(
        "--replica",
        action="append",
        dest="replicas",
        metavar="URL[,kind=K][,group=G]",
        help="a static replica; repeat for more",
    )
    parser.add_argument("--replica-kind", choices=["vllm", "sglang", "emulator"], help="default engine kind")
    parser.add_argument("--dns-service", help="discover replicas by resolving this headless Service name")
    parser.add_argument("--dns-port", type=int, help="replica port with --dns-service (default 8000)")
    parser.add_argument("--dns-interval", type=float, dest="dns_interval_s", help="re-resolve period (s)")
    parser.add_argument("--k8s-service", help="discover replicas from this Service's EndpointSlices")
    parser.add_argument("--k8s-namespace", help="namespace of --k8s-service (default: the pod's)")
    parser.add_argument("--k8s-port-name", help="port name in the EndpointSlices")
    parser.add_argument("--policy", help=f"routing policy: {', '.join(available_routing_policies())}")
    parser.add_argument(
        "--engine-scheduler",
        action="append",
        metavar="[GROUP=]NAME",
        help="engine-level scheduler for a replica group (default group: all)",
    )
    parser.add_argument("--scrape-interval", type=float, dest="scrape_interval_s", help="seconds between scrapes")
    parser.add_argument("--max-attempts", type=int, help="tries per request across replicas before any byte")
    parser.add_argument(
        "--redis-url",
        help="share state with the fleet's other routers through Redis (redis://, rediss://, redis+sentinel://, "
        "redis+cluster://; or FLEETROUTE_REDIS_URL); default: in-memory, this router only",
    )
    parser.add_argument("--fleet", help="fleet name: routers with the same name share state (default 'default')")
    parser.add_argument(
        "--state-sync-interval", type=float, dest="state_sync_interval_s", help="seconds between syncs (default 0.1)"
    )
    parser.add_argument(
        "--state-publish-interval",
        type=float,
        dest="state_publish_interval_s",
        help="least seconds between two pushes of changes to the other routers (default 0.005)",
    )
    parser.add_argument(
        "--state-ttl", type=float, dest="state_ttl_s", help="a dead router's share expires after this (default 3 s)"
    )
    parser.add_argument(
        "--redis-prefix-max-entries", type=int, help="budget of the shared prefix index in Redis (default 262144)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", choices=["json", "text"], help="log format (default json)")


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "host", "port", "admin_host", "admin_port", "admin_token", "replicas", "replica_kind", "dns_service",
        "dns_port", "dns_interval_s", "k8s_service", "k8s_namespace", "k8s_port_name", "policy",
        "scrape_interval_s", "max_attempts", "log_level", "redis_url", "fleet", "state_sync_interval_s",
        "state_publish_interval_s", "state_ttl_s", "redis_prefix_max_entries",
    )  # fmt: skip
    out: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if args.log_format is not None:
        out["log_json"] = args.log_format == "json"
    if args.engine_scheduler:
        schedulers: dict[str, str] = {}
        for item in args.engine_scheduler:
            group, _, name = item.rpartition("=")
            schedulers[group or "*"] = name
        out["engine_schedulers"] = schedulers
    return out


def run_serve(args: argparse.Namespace) -> int:
    from router.app import serve

    try:
        settings = load_settings(settings_overrides(args), args.config)
    except ConfigError as exc:
        print(f"fleetroute serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(settings))
    except KeyboardInterrupt:
        pass
    return 0
