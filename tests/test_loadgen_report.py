"""Metric arithmetic of the load generator's report, against hand-worked examples."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from loadgen.output import read_records, write_results
from loadgen.progress import Progress
from loadgen.records import RequestRecord, record_from_row, record_to_row
from loadgen.report import format_summary, parse_goodput, percentile, summarize, throughput_timeline


def rec(rid: str, start: float, inp: int, out: int, ttft: float | None, itls: list[float], e2e: float) -> RequestRecord:
    return RequestRecord(rid, start=start, input_len=inp, output_len=out, ttft=ttft, itls=itls, e2e=e2e)


def records() -> list[RequestRecord]:
    """Four requests, worked by hand below (times in seconds)."""
    return [
        # 4 chunks: at 0.10, 0.12, 0.15, 0.16; TPOT = (0.16 - 0.10) / 3 = 20 ms.
        replace(rec("a", 0.0, 100, 4, 0.10, [0.02, 0.03, 0.01], 0.16), cached_tokens=50),
        # 2 chunks at 0.80 and 0.85; TPOT = 50 ms.
        rec("b", 0.5, 200, 2, 0.30, [0.05], 0.35),
        # One token, at 3.5 s: no TPOT; TTFT 2.5 s misses the default 2 s SLO.
        replace(rec("c", 1.0, 300, 1, 2.5, [], 2.5), cached_tokens=100),
        # Failed after 0.5 s: counts in `failed`, duration and concurrency only.
        replace(rec("d", 1.5, 400, 0, None, [], 0.5), error="HTTP 500: boom"),
    ]


def test_summary_by_hand() -> None:
    s = summarize(records())
    assert s["duration"] == pytest.approx(3.5)  # first start 0.0 .. last end 1.0 + 2.5
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (600, 7)
    assert s["request_throughput"] == pytest.approx(3 / 3.5)
    assert s["output_throughput"] == pytest.approx(2.0)
    assert s["total_token_throughput"] == pytest.approx(607 / 3.5)
    assert s["request_goodput"] == pytest.approx(2 / 3.5)  # a and b meet TTFT <= 2000 and TPOT <= 100
    assert s["slo_attainment"] == pytest.approx(2 / 3)
    assert s["prefix_cache_hit_rate"] == pytest.approx(150 / 600)
    assert s["max_concurrent_requests"] == 2  # c [1.0, 3.5) overlaps d [1.5, 2.0)
    assert s["max_output_tokens_per_s"] == pytest.approx(6.0)  # 4 + 2 chunks in the first second
    # TTFT 100, 300, 2500 ms.
    assert s["mean_ttft_ms"] == pytest.approx(2900 / 3)
    assert s["median_ttft_ms"] == pytest.approx(300)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt(((100 - 2900 / 3) ** 2 + (300 - 2900 / 3) ** 2
                                                         + (2500 - 2900 / 3) ** 2) / 3))  # fmt: skip
    assert s["p90_ttft_ms"] == pytest.approx(300 + 0.8 * 2200)  # rank 1.8, linear as NumPy
    assert s["p99_ttft_ms"] == pytest.approx(300 + 0.98 * 2200)
    # TPOT 20 and 50 ms; the one-token reply has none.
    assert s["mean_tpot_ms"] == pytest.approx(35)
    assert s["median_tpot_ms"] == pytest.approx(35)
    assert s["std_tpot_ms"] == pytest.approx(15)
    assert s["p99_tpot_ms"] == pytest.approx(20 + 0.99 * 30)
    # ITL pools every gap: 10, 20, 30, 50 ms.
    assert s["mean_itl_ms"] == pytest.approx(27.5)
    assert s["median_itl_ms"] == pytest.approx(25)
    assert s["p90_itl_ms"] == pytest.approx(30 + 0.7 * 20)
    assert s["p99_itl_ms"] == pytest.approx(30 + 0.97 * 20)
    # E2E 160, 350, 2500 ms.
    assert s["mean_e2el_ms"] == pytest.approx(3010 / 3)
    assert s["median_e2el_ms"] == pytest.approx(350)
    assert "ttfts" not in s


def test_goodput_slos() -> None:
    assert summarize(records(), {"tpot": 30})["request_goodput"] == pytest.approx(2 / 3.5)  # a, and c (TPOT 0)
    assert summarize(records(), {"ttft": 2000, "tpot": 30})["request_goodput"] == pytest.approx(1 / 3.5)
    assert summarize(records(), {"e2el": 200})["slo_attainment"] == pytest.approx(1 / 3)
    assert summarize(records(), {})["slo_attainment"] == 1.0
    assert parse_goodput(["ttft:2000", "tpot:100"]) == {"ttft": 2000.0, "tpot": 100.0}
    assert parse_goodput(["ttft:500 e2el:1e4"]) == {"ttft": 500.0, "e2el": 10000.0}
    for bad in ("ttft", "itl:5", "ttft:x", "tpot:-1", "e2el:inf"):
        with pytest.raises(ValueError, match="bad goodput item"):
            parse_goodput([bad])


def test_percentile_and_custom_percentiles() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    s = summarize(records(), percentiles=(50, 99.9))
    assert s["p50_ttft_ms"] == pytest.approx(300) and "p99.9_ttft_ms" in s and "p90_ttft_ms" not in s


def test_empty_and_all_failed() -> None:
    empty = summarize([])
    assert empty["completed"] == empty["failed"] == 0 and empty["duration"] == 0.0
    assert empty["mean_ttft_ms"] == 0.0 and empty["request_throughput"] == 0.0
    failed = summarize([RequestRecord("x", start=0.0, e2e=0.01, error="refused")])
    assert (failed["completed"], failed["failed"], failed["prefix_cache_hit_rate"]) == (0, 1, 0.0)
    json.dumps(failed, allow_nan=False)


def test_detailed_arrays_like_vllm() -> None:
    s = summarize(records(), detailed=True)
    assert s["input_lens"] == [100, 200, 300, 400]
    assert s["output_lens"] == [4, 2, 1, 0]
    assert s["ttfts"] == [0.10, 0.30, 2.5, 0.0]
    assert s["itls"] == [[0.02, 0.03, 0.01], [0.05], [], []]
    assert s["errors"] == ["", "", "", "HTTP 500: boom"]
    assert s["start_times"] == [0.0, 0.5, 1.0, 1.5]


def test_throughput_timeline() -> None:
    timeline = throughput_timeline(records())
    assert timeline.completed_per_s == [2.0, 0.0, 0.0, 1.0]
    assert timeline.output_tokens_per_s == pytest.approx([6.0, 0.0, 0.0, 1.0])
    assert throughput_timeline([]).completed_per_s == []


def test_format_summary_table() -> None:
    table = format_summary(summarize(records()))
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:                     3" in lines
    assert "Failed requests:                         1" in lines
    assert "Benchmark duration (s):                  3.50" in lines
    assert "Request goodput (req/s):                 0.57" in lines
    assert "Median TTFT (ms):                        300.00" in lines
    assert "P99 TPOT (ms):                           49.70" in lines
    assert "---------------Inter-token Latency----------------" in lines
    assert lines[-1] == "=" * 50


def test_rows_round_trip(tmp_path: Path) -> None:
    original = records()
    for record in original:
        back = record_from_row(json.loads(json.dumps(record_to_row(record))))
        assert back.request_id == record.request_id and back.error == record.error
        assert back.ttft == pytest.approx(record.ttft) and back.itls == pytest.approx(record.itls)
    row = record_to_row(original[0])
    assert row["tpot_ms"] == pytest.approx(20) and row["ttft_ms"] == pytest.approx(100)
    summary_path, rows_path = write_results(tmp_path / "out" / "run.json", summarize(original), original, {"k": 1})
    assert rows_path == tmp_path / "out" / "run.jsonl"
    saved = json.loads(summary_path.read_text())
    assert saved["k"] == 1 and saved["completed"] == 3
    again = summarize(read_records(rows_path))
    for key, value in summarize(original).items():
        assert again[key] == pytest.approx(value), key


def test_progress_line() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream=stream, width=8)
    progress.finished(True)
    progress.finished(False)
    assert progress.line().startswith("[####....] 2/4  50% ")
    assert ", 1 failed, " in progress.line()
    progress.close()
    assert stream.getvalue().startswith("\r[####....] 2/4") and stream.getvalue().endswith("\n")
