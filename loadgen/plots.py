"""PNG plots of a run: TTFT and TPOT CDFs, and throughput over time (1-s bins).

matplotlib is imported only here and only when plots are asked for: it costs most of a second to load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadgen.records import RequestRecord
from loadgen.report import throughput_timeline

__all__ = ["write_plots"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(plt: Any, values_ms: Sequence[float], name: str, slo: float | None, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    ordered = sorted(values_ms)
    if ordered:
        n = len(ordered)
        axes.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{name} ({n} requests)")
    if slo is not None:
        axes.axvline(slo, color="tab:red", linestyle="--", label=f"SLO {slo:g} ms")
    axes.set_xlabel(f"{name} (ms)")
    axes.set_ylabel("fraction of completed requests")
    axes.set_ylim(0, 1.01)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"{name} CDF")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _throughput(plt: Any, records: Sequence[RequestRecord], path: Path) -> Path:
    timeline = throughput_timeline(records, 1.0)
    edges = [i * timeline.bin_seconds for i in range(len(timeline.completed_per_s) + 1)]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.stairs(timeline.completed_per_s, edges, fill=True, color="tab:blue", alpha=0.7)
    top.set_ylabel("completed req/s")
    bottom.stairs(timeline.output_tokens_per_s, edges, fill=True, color="tab:green", alpha=0.7)
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel("time since start (s, 1-s bins)")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.set_title("Throughput over time")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plots(
    records: Sequence[RequestRecord], directory: Path, stem: str = "loadgen", slos: Mapping[str, float] | None = None
) -> list[Path]:
    """Write ``<stem>_ttft_cdf.png``, ``<stem>_tpot_cdf.png`` and ``<stem>_throughput.png``; return the paths."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    slos = slos or {}
    done = [r for r in records if r.ok]
    ttfts = [r.ttft * 1000.0 for r in done if r.ttft is not None]
    tpots = [t * 1000.0 for t in (r.tpot for r in done) if t is not None]
    return [
        _cdf(plt, ttfts, "TTFT", slos.get("ttft"), directory / f"{stem}_ttft_cdf.png"),
        _cdf(plt, tpots, "TPOT", slos.get("tpot"), directory / f"{stem}_tpot_cdf.png"),
        _throughput(plt, records, directory / f"{stem}_throughput.png"),
    ]
