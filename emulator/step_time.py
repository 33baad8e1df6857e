"""How long one engine iteration takes, from what the iteration computes.

``t = max(T_w, t0 + a·N) + b·C + c·A + t_oh + d·B`` (shared/reference/sim-traces.md §1.10):
the linear layers are bound either by streaming the weights or by compute over the ``N`` scheduled
tokens; attention reads ``C`` context tokens of KV and spends ``A`` causal units on prefill chunks;
the step and each of its ``B`` sequences carry a fixed overhead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from emulator.profiles import StepTimeCoefficients


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one step computes; the only inputs of the step-time model."""

    num_tokens: int  # N: prefill chunk tokens + one per decoding sequence
    num_seqs: int  # B: scheduled sequences
    context_tokens: int  # C: sum over sequences of (tokens already in KV + new tokens)
    prefill_attention_units: float  # A: sum over prefill chunks of c·(p + c/2)


def prefill_attention_units(num_computed: int, chunk: int) -> float:
    """Causal attention work of a prefill chunk of ``chunk`` tokens after ``num_computed`` in KV."""
    return chunk * (num_computed + chunk / 2)


class StepTimeModel:
    """Deterministic step times, with optional seeded multiplicative Gaussian jitter."""

    def __init__(self, coefficients: StepTimeCoefficients, jitter: float = 0.0, seed: int = 0) -> None:
        self._c = coefficients
        self._jitter = jitter
        self._rng = random.Random(seed)

    def step_ms(self, shape: BatchShape) -> float:
        c = self._c
        linear = max(c.weight_floor_ms, c.linear_base_ms + c.linear_ms_per_token * shape.num_tokens)
        t = (
            linear
            + c.attn_ms_per_context_token * shape.context_tokens
            + c.attn_ms_per_prefill_unit * shape.prefill_attention_units
            + c.step_overhead_ms
            + c.seq_overhead_ms * shape.num_seqs
        )
        if self._jitter:
            # Clamp so a rare large draw never produces a non-physical (negative or tiny) step.
            t *= min(1.5, max(0.5, self._rng.gauss(1.0, self._jitter)))
        return t

    def decode_span_ms(self, num_seqs: int, context_tokens: int, steps: int) -> float:
        """Total time of ``steps`` consecutive pure-decode steps of a stable batch, without jitter.

        Each step adds one token of context per sequence, so ``C`` grows by ``num_seqs`` per step; the
        sum is closed-form, which lets a simulator skip over stable decode phases.
        """
        c = self._c
        per_step = (
            max(c.weight_floor_ms, c.linear_base_ms + c.linear_ms_per_token * num_seqs)
            + c.step_overhead_ms
            + c.seq_overhead_ms * num_seqs
        )
        context_sum = steps * context_tokens + num_seqs * steps * (steps - 1) / 2
        return steps * per_step + c.attn_ms_per_context_token * context_sum
