"""Trace readers, format detection, the synthetic workload and arrival timing of the load generator."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from emulator.tokenizer import get_tokenizer
from loadgen.arrivals import gamma_intervals, retime, scale_arrivals
from loadgen.synthetic import SyntheticWorkload, generate_synthetic
from loadgen.traces import TraceError, TraceRequest, detect_format, read_azure, read_mooncake, read_trace

HEAD500 = Path(__file__).parent / "data" / "mooncake_conversation_head500.jsonl"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data traces not available")


def slice_of(source: Path, lines: int, target: Path, trailing_newline: bool = False) -> Path:
    """The first ``lines`` lines of a real trace, without the final newline (like the Azure files)."""
    with source.open() as f:
        head = [next(f).rstrip("\n") for _ in range(lines)]
    target.write_text("\n".join(head) + ("\n" if trailing_newline else ""))
    return target


# ---------------------------------------------------------------------------------------------------------
# Mooncake
# ---------------------------------------------------------------------------------------------------------


def test_mooncake_committed_slice() -> None:
    rows = read_mooncake(HEAD500)
    assert len(rows) == 500
    first = rows[0]
    assert first == TraceRequest(0.0, 6758, 500, hash_ids=tuple(range(14)))
    assert rows[-1].arrival == pytest.approx(165.0)
    assert all(len(r.hash_ids or ()) == math.ceil(r.input_length / 512) for r in rows)
    assert [r.arrival for r in rows] == sorted(r.arrival for r in rows)
    assert read_mooncake(HEAD500, limit=20) == rows[:20]


@needs_shared
def test_mooncake_real_files_slices(tmp_path: Path) -> None:
    for name in ("mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl"):
        rows = read_trace(slice_of(SHARED / name, 300, tmp_path / name))
        assert len(rows) == 300 and rows[0].arrival == 0.0
        assert all(r.hash_ids is not None and r.output_length >= 1 for r in rows)


def test_mooncake_offsets_start_at_first_row(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    path.write_text(
        '{"timestamp": 5000, "input_length": 10, "output_length": 2, "hash_ids": [7]}\n\n'
        '{"timestamp": 7500, "input_length": 600, "output_length": 3, "hash_ids": [7, 8]}'
    )
    rows = read_mooncake(path)
    assert [r.arrival for r in rows] == [0.0, 2.5]
    assert rows[1].hash_ids == (7, 8)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"timestamp": 0, "input_length": 10', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"input_length": 10, "output_length": 2, "hash_ids": [1]}', "missing field 'timestamp'"),
        ('{"timestamp": 0, "output_length": 2, "hash_ids": [1]}', "missing field 'input_length'"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]}', "missing field 'output_length'"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 2}', "missing field 'hash_ids'"),
        ('{"timestamp": 0, "input_length": 1000, "output_length": 2, "hash_ids": [1]}', "need exactly 2"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1, 2]}', "need exactly 1"),
        ('{"timestamp": 0, "input_length": "10", "output_length": 2, "hash_ids": [1]}', "must be an integer"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 0, "hash_ids": [1]}', "at least 1"),
        ('{"timestamp": -1, "input_length": 10, "output_length": 2, "hash_ids": [1]}', "'timestamp'"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": ["a"]}', "list of integers"),
    ],
)
def test_mooncake_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}'
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(TraceError, match=message) as info:
        read_mooncake(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.line == 3 and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for path in (empty, blank):
        with pytest.raises(TraceError, match="empty"):
            read_trace(path)
        with pytest.raises(TraceError, match="no requests"):
            read_mooncake(path)
    with pytest.raises(TraceError, match="empty"):
        read_azure(empty)
    with pytest.raises(TraceError, match="cannot open"):
        read_trace(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Azure
# ---------------------------------------------------------------------------------------------------------


@needs_shared
def test_azure_real_files_slices(tmp_path: Path) -> None:
    conv = read_azure(slice_of(SHARED / "AzureLLMInferenceTrace_conv_2023.csv", 201, tmp_path / "conv.csv"))
    assert len(conv) == 200
    # 18:15:46.6805900 -> 18:15:50.9951690: all seven fractional digits count.
    assert conv[0] == TraceRequest(0.0, 374, 44)
    assert conv[1].arrival == pytest.approx(4.314579, abs=1e-6)
    assert conv[1].input_length == 396 and conv[1].output_length == 109
    code = read_trace(slice_of(SHARED / "AzureLLMInferenceTrace_code_2023.csv", 51, tmp_path / "code.csv"))
    assert len(code) == 50 and code[0].arrival == 0.0 and code[0].hash_ids is None


@needs_shared
def test_azure_whole_file_without_trailing_newline() -> None:
    rows = read_azure(SHARED / "AzureLLMInferenceTrace_code_2023.csv")
    assert len(rows) == 8819
    assert rows[-1].arrival == pytest.approx(3436, abs=1.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2023-11-16 18:15:46,374,44", None),
        ("2023/11/16 18:15:46.1,374,44", "bad TIMESTAMP"),
        ("2023-11-16 18:15,374,44", "bad TIMESTAMP"),
        ("2023-13-16 18:15:46.1,374,44", "out of range"),
        ("2023-11-16 18:15:46.1,374", "expected 3 columns"),
        ("2023-11-16 18:15:46.1,x,44", "ContextTokens must be a positive integer"),
        ("2023-11-16 18:15:46.1,374,0", "GeneratedTokens must be a positive integer"),
    ],
)
def test_azure_rows(tmp_path: Path, line: str, message: str | None) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:40.0000000,10,2\n{line}")
    if message is None:
        assert read_azure(path)[1] == TraceRequest(6.0, 374, 44)
        return
    with pytest.raises(TraceError, match=message) as info:
        read_azure(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_azure_header_only_and_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens")
    with pytest.raises(TraceError, match="no requests"):
        read_azure(path)
    path.write_text("time,in,out\n1,2,3")
    with pytest.raises(TraceError, match=r":1: header must name"):
        read_azure(path)


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


def test_detection_by_content(tmp_path: Path) -> None:
    assert detect_format(HEAD500) == "mooncake"
    azure = tmp_path / "trace.txt"  # the name does not matter
    azure.write_text("\nTIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44")
    assert detect_format(azure) == "azure"
    assert read_trace(azure) == [TraceRequest(0.0, 374, 44)]
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "hi"}\n')
    with pytest.raises(TraceError, match=r"other.jsonl:1: unknown trace format.*--trace-format"):
        detect_format(other)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    with pytest.raises(TraceError, match=":1: "):
        read_trace(broken)


def test_format_override(tmp_path: Path) -> None:
    rows = read_trace(HEAD500, "mooncake", limit=3)
    assert len(rows) == 3
    with pytest.raises(TraceError, match=":1: header must name"):
        read_trace(HEAD500, "azure")
    with pytest.raises(TraceError, match="synthetic"):
        read_trace(HEAD500, "synthetic")


# ---------------------------------------------------------------------------------------------------------
# Synthetic workload
# ---------------------------------------------------------------------------------------------------------


def test_synthetic_sessions_grow_and_share_system_prompts() -> None:
    workload = SyntheticWorkload(sessions=30, tenants=3, seed=7)
    requests = generate_synthetic(workload)
    assert requests == generate_synthetic(workload)
    assert requests != generate_synthetic(SyntheticWorkload(sessions=30, tenants=3, seed=8))
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    sessions: dict[str, list[TraceRequest]] = {}
    for r in requests:
        assert r.session_id is not None
        sessions.setdefault(r.session_id, []).append(r)
    assert len(sessions) == 30
    count = get_tokenizer().token_count
    system_by_tenant: dict[str, str] = {}
    for turns in sessions.values():
        turns.sort(key=lambda r: r.turn)
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert workload.min_turns <= len(turns) <= workload.max_turns
        assert len({t.tenant for t in turns}) == 1
        first = turns[0]
        assert first.messages is not None and first.messages[0][0] == "system" and first.think_time == 0.0
        assert system_by_tenant.setdefault(first.tenant, first.messages[0][1]) == first.messages[0][1]
        assert count(first.messages[0][1]) == workload.system_prompt_tokens
        planned = 0
        for turn in turns:
            assert turn.messages is not None and turn.is_follow_up == (turn.turn > 0)
            planned += sum(count(text) for _, text in turn.messages)
            assert turn.input_length == planned  # content tokens, replies of the planned length included
            planned += turn.output_length
            assert 64 <= turn.output_length <= 192
    assert len(set(system_by_tenant.values())) == len(system_by_tenant) > 1


def test_synthetic_tenant_rates() -> None:
    requests = generate_synthetic(
        SyntheticWorkload(sessions=3000, tenant_rates=(3.0, 1.0), min_turns=1, max_turns=1, system_prompt_tokens=8)
    )
    share = sum(r.tenant == "tenant-0" for r in requests) / len(requests)
    assert share == pytest.approx(0.75, abs=0.03)
    assert len(requests) / requests[-1].arrival == pytest.approx(4.0, rel=0.08)
    assert SyntheticWorkload(tenants=2, session_rate=3.0, tenant_skew=1.0).rates() == pytest.approx((2.0, 1.0))
    with pytest.raises(ValueError, match="min_turns"):
        generate_synthetic(SyntheticWorkload(min_turns=3, max_turns=2))


# ---------------------------------------------------------------------------------------------------------
# Arrivals
# ---------------------------------------------------------------------------------------------------------


def test_rate_scale() -> None:
    rows = [TraceRequest(0.0, 1, 1), TraceRequest(3.0, 1, 1, session_id="s", turn=1, think_time=2.0)]
    faster = scale_arrivals(rows, 4.0)
    assert [(r.arrival, r.think_time) for r in faster] == [(0.0, 0.0), (0.75, 0.5)]
    assert scale_arrivals(rows, 1.0) == rows
    with pytest.raises(ValueError):
        scale_arrivals(rows, 0.0)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_intervals_mean_rate_and_shape(burstiness: float) -> None:
    gaps = gamma_intervals(40_000, rate=8.0, burstiness=burstiness, seed=3)
    assert gaps == gamma_intervals(40_000, rate=8.0, burstiness=burstiness, seed=3)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 8.0, rel=0.03)
    # A gamma distribution's coefficient of variation is 1/sqrt(shape): 1 for Poisson.
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert gamma_intervals(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        gamma_intervals(3, 0.0)


def test_retime_keeps_follow_ups_with_their_session() -> None:
    rows = [
        TraceRequest(0.0, 1, 1),
        TraceRequest(10.0, 1, 1, session_id="a"),
        TraceRequest(12.0, 1, 1, session_id="a", turn=1, think_time=2.0),
        TraceRequest(20.0, 1, 1),
    ]
    out = retime(rows, rate=100.0, seed=1)
    assert out == retime(rows, rate=100.0, seed=1)
    independent = [r for r in out if not r.is_follow_up]
    assert independent[0].arrival == 0.0 and len(independent) == 3
    assert [r.input_length for r in out] == [1, 1, 1, 1]
    start = next(r.arrival for r in out if r.session_id == "a" and r.turn == 0)
    follow = next(r for r in out if r.is_follow_up)
    assert follow.arrival == pytest.approx(start + 2.0) and follow.think_time == 2.0
    many = retime([TraceRequest(float(i), 1, 1) for i in range(20_000)], rate=50.0, seed=5)
    assert len(many) / many[-1].arrival == pytest.approx(50.0, rel=0.03)
