"""``fleetroute engine``: serve one or more emulated vLLM replicas."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

from emulator.profiles import builtin_profile_names, load_profile
from emulator.server import ReplicaConfig, serve_replicas
from policies.scheduling import available_scheduling_policies


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=8000, help="port of a single replica (default 8000)")
    where.add_argument("--replicas", type=int, help="serve N independent replicas on consecutive ports")
    parser.add_argument("--base-port", type=int, default=8000, help="first port with --replicas (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--profile",
        default="h100-llama3-8b",
        help=f"engine profile: {', '.join(builtin_profile_names())}, or a YAML file (default h100-llama3-8b)",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="divide all model time by K (default 1)")
    parser.add_argument(
        "--scheduler",
        default="fcfs",
        choices=available_scheduling_policies(),
        help="engine-level scheduling policy (default fcfs)",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help="served model name; repeat for aliases (default: the profile's model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of step-time jitter and replica differences")
    parser.add_argument("--jitter", type=float, help="relative std-dev of step-time noise (default: the profile's)")
    parser.add_argument(
        "--mean-output-tokens",
        type=int,
        default=256,
        help="mean reply length when a request does not force its length with ignore_eos (default 256)",
    )


def run_engine(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
    except ValueError as exc:
        raise SystemExit(f"fleetroute engine: {exc}") from None
    if args.jitter is not None:
        profile = profile.model_copy(update={"jitter": args.jitter})
    if args.speed <= 0:
        raise SystemExit("fleetroute engine: --speed must be positive")
    if args.replicas is not None and args.replicas < 1:
        raise SystemExit("fleetroute engine: --replicas must be at least 1")
    count = args.replicas or 1
    ports = [args.base_port + i for i in range(count)] if args.replicas else [args.port]
    configs = [
        ReplicaConfig(
            profile=profile,
            models=args.models or [],
            speed=args.speed,
            scheduler=args.scheduler,
            seed=args.seed + i,
            replica_index=i,
            mean_output_tokens=args.mean_output_tokens,
        )
        for i in range(count)
    ]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_replicas(configs, args.host, ports))
    except KeyboardInterrupt:
        pass
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where available: the emulator shares its two cores with the router under test."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
