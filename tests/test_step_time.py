"""The step-time model against the worked values of sim-traces.md §1.10, decode spans and jitter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.profiles import StepTimeCoefficients, load_profile
from emulator.step_time import BatchShape, StepTimeModel, prefill_attention_units


def _prefill(n: int, cached: int = 0) -> BatchShape:
    return BatchShape(
        num_tokens=n,
        num_seqs=1,
        context_tokens=cached + n,
        prefill_attention_units=prefill_attention_units(cached, n),
    )


def _decode(batch: int, ctx: int) -> BatchShape:
    return BatchShape(num_tokens=batch, num_seqs=batch, context_tokens=batch * ctx, prefill_attention_units=0.0)


# (case, shape, A100 ms, H100 ms) — the "A100 model" and "H100 model" columns of §1.10.
WORKED: list[tuple[str, BatchShape, float, float]] = [
    ("prefill 256", _prefill(256), 20.2, 11.1),
    ("prefill 1024", _prefill(1024), 72.4, 27.6),
    ("prefill 2048", _prefill(2048), 144.6, 50.5),
    ("prefill 4096", _prefill(4096), 298.0, 99.5),
    ("prefill 8192", _prefill(8192), 642.0, 210.0),
    ("decode b1 ctx1000", _decode(1, 1000), 11.4, 7.4),
    ("decode b64 ctx2000", _decode(64, 2000), 22.1, 13.9),
    ("decode b256 ctx1000", _decode(256, 1000), 42.2, 24.7),
    (
        "512 chunk + 63 decodes @2000",
        BatchShape(
            num_tokens=512 + 63,
            num_seqs=64,
            context_tokens=512 + 63 * 2000,
            prefill_attention_units=prefill_attention_units(0, 512),
        ),
        52.2,
        24.3,
    ),
    ("2048 chunk after 6000 cached", _prefill(2048, cached=6000), 180.7, 63.1),
]


@pytest.mark.parametrize(("case", "shape", "a100_ms", "h100_ms"), WORKED, ids=[w[0] for w in WORKED])
def test_worked_values_a100(case: str, shape: BatchShape, a100_ms: float, h100_ms: float) -> None:
    model = StepTimeModel(load_profile("a100-llama3-8b").step_time)
    assert model.step_ms(shape) == pytest.approx(a100_ms, rel=0.01), case


@pytest.mark.parametrize(("case", "shape", "a100_ms", "h100_ms"), WORKED, ids=[w[0] for w in WORKED])
def test_worked_values_h100(case: str, shape: BatchShape, a100_ms: float, h100_ms: float) -> None:
    model = StepTimeModel(load_profile("h100-llama3-8b").step_time)
    assert model.step_ms(shape) == pytest.approx(h100_ms, rel=0.01), case


def test_formula_terms_by_hand() -> None:
    c = StepTimeCoefficients(
        weight_floor_ms=5.0,
        linear_base_ms=1.0,
        linear_ms_per_token=0.5,
        attn_ms_per_context_token=0.01,
        attn_ms_per_prefill_unit=0.001,
        step_overhead_ms=2.0,
        seq_overhead_ms=0.25,
    )
    m = StepTimeModel(c)
    # Weight floor binds: 1 + 0.5*4 = 3 < 5.
    assert m.step_ms(BatchShape(4, 4, 100, 0.0)) == pytest.approx(5.0 + 1.0 + 2.0 + 1.0)
    # Compute binds: 1 + 0.5*20 = 11 > 5.
    assert m.step_ms(BatchShape(20, 2, 300, 1000.0)) == pytest.approx(11.0 + 3.0 + 1.0 + 2.0 + 0.5)


def test_prefill_attention_units_is_causal_area() -> None:
    assert prefill_attention_units(0, 256) == 256 * 128
    assert prefill_attention_units(6000, 2048) == 2048 * (6000 + 1024)
    # Two chunks cost the same attention work as one chunk of the same total.
    assert prefill_attention_units(0, 100) + prefill_attention_units(100, 60) == pytest.approx(
        prefill_attention_units(0, 160)
    )


def test_step_time_is_monotone_in_each_input() -> None:
    m = StepTimeModel(load_profile("h100-llama3-8b").step_time)
    base = BatchShape(600, 10, 5000, 1e5)
    t = m.step_ms(base)
    assert m.step_ms(BatchShape(601, 10, 5000, 1e5)) >= t
    assert m.step_ms(BatchShape(600, 11, 5000, 1e5)) > t
    assert m.step_ms(BatchShape(600, 10, 5001, 1e5)) > t
    assert m.step_ms(BatchShape(600, 10, 5000, 2e5)) > t


# ---------------------------------------------------------------------------------------- decode span


@pytest.mark.parametrize("profile", ["h100-llama3-8b", "a100-llama3-8b", "h100-llama2-70b-tp8"])
@pytest.mark.parametrize(("num_seqs", "ctx", "steps"), [(1, 1000, 1), (1, 1000, 50), (64, 128_000, 17), (300, 10, 5)])
def test_decode_span_equals_sum_of_decode_steps(profile: str, num_seqs: int, ctx: int, steps: int) -> None:
    m = StepTimeModel(load_profile(profile).step_time)
    total = sum(m.step_ms(BatchShape(num_seqs, num_seqs, ctx + k * num_seqs, 0.0)) for k in range(steps))
    assert m.decode_span_ms(num_seqs, ctx, steps) == pytest.approx(total, rel=1e-9)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    num_seqs=st.integers(1, 2048),
    ctx=st.integers(0, 2_000_000),
    steps=st.integers(0, 200),
)
def test_decode_span_property(num_seqs: int, ctx: int, steps: int) -> None:
    m = StepTimeModel(load_profile("a100-llama3-8b").step_time)
    total = sum(m.step_ms(BatchShape(num_seqs, num_seqs, ctx + k * num_seqs, 0.0)) for k in range(steps))
    assert m.decode_span_ms(num_seqs, ctx, steps) == pytest.approx(total, rel=1e-9, abs=1e-9)


def test_decode_span_ignores_jitter() -> None:
    coeffs = load_profile("h100-llama3-8b").step_time
    assert StepTimeModel(coeffs, jitter=0.3, seed=4).decode_span_ms(8, 800, 10) == pytest.approx(
        StepTimeModel(coeffs).decode_span_ms(8, 800, 10)
    )


# ---------------------------------------------------------------------------------------- jitter

SHAPES = [_prefill(256), _decode(64, 2000), _decode(1, 10), _prefill(2048, cached=6000)]


def _draws(seed: int, jitter: float, n: int = 200) -> list[float]:
    m = StepTimeModel(load_profile("h100-llama3-8b").step_time, jitter=jitter, seed=seed)
    return [m.step_ms(SHAPES[i % len(SHAPES)]) for i in range(n)]


def test_no_jitter_is_exact() -> None:
    coeffs = load_profile("h100-llama3-8b").step_time
    plain = StepTimeModel(coeffs)
    for seed in (0, 1, 99):
        m = StepTimeModel(coeffs, jitter=0.0, seed=seed)
        assert [m.step_ms(s) for s in SHAPES] == [plain.step_ms(s) for s in SHAPES]


def test_jitter_deterministic_for_a_seed() -> None:
    assert _draws(7, 0.05) == _draws(7, 0.05)


def test_jitter_differs_between_seeds() -> None:
    a, b = _draws(1, 0.05), _draws(2, 0.05)
    assert a != b
    assert sum(x != y for x, y in zip(a, b, strict=True)) > len(a) // 2


def test_jitter_actually_perturbs() -> None:
    plain = StepTimeModel(load_profile("h100-llama3-8b").step_time)
    base = [plain.step_ms(SHAPES[i % len(SHAPES)]) for i in range(200)]
    draws = _draws(3, 0.05)
    ratios = [d / b for d, b in zip(draws, base, strict=True)]
    assert any(r != 1.0 for r in ratios)
    mean = sum(ratios) / len(ratios)
    assert 0.97 < mean < 1.03


@pytest.mark.parametrize("jitter", [0.05, 0.3, 0.5])
def test_jitter_stays_within_clamp(jitter: float) -> None:
    coeffs = load_profile("h100-llama3-8b").step_time
    plain = StepTimeModel(coeffs)
    m = StepTimeModel(coeffs, jitter=jitter, seed=11)
    ratios = []
    for i in range(2000):
        shape = SHAPES[i % len(SHAPES)]
        ratios.append(m.step_ms(shape) / plain.step_ms(shape))
    assert min(ratios) >= 0.5 - 1e-12
    assert max(ratios) <= 1.5 + 1e-12
    if jitter == 0.5:
        # With sigma 0.5, ~16 % of draws fall outside ±1 sigma: the clamp must be hit on both sides.
        assert min(ratios) == pytest.approx(0.5)
        assert max(ratios) == pytest.approx(1.5)
