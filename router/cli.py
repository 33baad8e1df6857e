"""The ``fleetroute`` command: one CLI for every component."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from router import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetroute", description="Load-balancing router for LLM inference fleets.")
    parser.add_argument("--version", action="version", version=f"fleetroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from router.serve_cli import add_serve_arguments, run_serve

    serve = sub.add_parser("serve", help="run the router in front of a fleet of replicas")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)

    from emulator.cli import add_engine_arguments, run_engine

    engine = sub.add_parser("engine", help="serve emulated vLLM replicas (no GPU needed)")
    add_engine_arguments(engine)
    engine.set_defaults(func=run_engine)

    from loadgen.cli import add_loadgen_arguments, run_loadgen

    loadgen = sub.add_parser("loadgen", help="replay a trace or a synthetic workload against an OpenAI endpoint")
    add_loadgen_arguments(loadgen)
    loadgen.set_defaults(func=run_loadgen)

    from emulator.sim.cli import add_sim_arguments, run_sim

    sim = sub.add_parser("sim", help="simulate a fleet and a routing policy on a trace, in virtual time")
    add_sim_arguments(sim)
    sim.set_defaults(func=run_sim)

    from emulator.sim.bench import add_bench_arguments, run_bench

    bench = sub.add_parser("bench", help="capacity at SLO of routing policies on traces (simulator)")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    from router.demo import add_demo_arguments, run_demo

    demo = sub.add_parser("demo", help="start an emulated fleet, run a short load and print a result table")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
