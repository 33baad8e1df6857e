"""A seeded synthetic workload: multi-turn conversations of several tenants.

Real traces either have prefix structure without sessions (Mooncake) or neither (Azure). This workload has
what session affinity and fair sharing need: each tenant has its own shared system prompt and its own
session arrival rate, and every conversation's context grows turn by turn with the replies it received.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from emulator.tokenizer import synthesize_text
from loadgen.traces import ChatMessage, TraceRequest

__all__ = ["SyntheticWorkload", "derive_seed", "generate_synthetic"]


@dataclass(frozen=True, slots=True)
class SyntheticWorkload:
    """Parameters of the synthetic workload (lengths in tokens, times in seconds)."""

    #: Conversations in the workload (all tenants together).
    sessions: int = 40
    #: Tenants, named ``tenant-0`` ... ``tenant-<n-1>``.
    tenants: int = 3
    #: New conversations per second, all tenants together (Poisson); split between tenants by ``tenant_skew``.
    session_rate: float = 2.0
    #: Tenant ``i`` gets a share proportional to ``1 / (i + 1) ** tenant_skew`` (0 = equal shares).
    tenant_skew: float = 1.0
    #: Explicit conversations per second per tenant; overrides ``tenants``, ``session_rate`` and ``tenant_skew``.
    tenant_rates: tuple[float, ...] | None = None
    #: Turns per conversation, uniform in ``[min_turns, max_turns]``.
    min_turns: int = 2
    max_turns: int = 6
    #: Length of each tenant's system prompt, shared by all of that tenant's conversations.
    system_prompt_tokens: int = 1024
    #: Mean length of a user message and of a reply; each drawn uniformly within ``± range_ratio`` of the mean.
    user_tokens: int = 256
    output_tokens: int = 128
    range_ratio: float = 0.5
    #: Mean pause (exponential) between receiving a reply and sending the next turn.
    think_time: float = 2.0
    seed: int = 0

    def rates(self) -> tuple[float, ...]:
        """Conversations per second of each tenant."""
        if self.tenant_rates is not None:
            return self.tenant_rates
        weights = [1.0 / (i + 1) ** self.tenant_skew for i in range(self.tenants)]
        total = sum(weights)
        return tuple(self.session_rate * w / total for w in weights)

    def validate(self) -> None:
        """Raise ValueError naming the first parameter that makes no workload."""
        rates = self.rates()
        checks = [
            (self.sessions >= 1, "sessions must be >= 1"),
            (len(rates) >= 1, "at least one tenant is needed"),
            (all(r > 0 for r in rates), "tenant rates must be > 0"),
            (1 <= self.min_turns <= self.max_turns, "turns need 1 <= min_turns <= max_turns"),
            (self.system_prompt_tokens >= 0, "system_prompt_tokens must be >= 0"),
            (self.user_tokens >= 1 and self.output_tokens >= 1, "user_tokens and output_tokens must be >= 1"),
            (0 <= self.range_ratio < 1, "range_ratio must be in [0, 1)"),
            (self.think_time >= 0, "think_time must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes (unlike ``hash``), so texts never collide by
    accident between tenants, sessions, turns and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _around(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return rng.randint(low, high)


def generate_synthetic(workload: SyntheticWorkload) -> list[TraceRequest]:
    """Every turn of every conversation, ordered by nominal arrival.

    Turn 0 carries the tenant's system prompt and a user message; later turns carry only their new user
    message (the client prepends the history, replies included). ``input_length`` is the planned prompt in
    content tokens, assuming every reply has its ``output_length``; a follow-up turn's ``arrival`` is nominal
    (the previous turn's arrival plus the think time, ignoring service time).
    """
    workload.validate()
    rng = random.Random(derive_seed("synthetic", workload.seed))
    rates = workload.rates()
    total_rate = sum(rates)
    names = [f"tenant-{i}" for i in range(len(rates))]
    system_prompts = [
        synthesize_text(workload.system_prompt_tokens, derive_seed(workload.seed, "sys", n)) for n in names
    ]
    requests: list[TraceRequest] = []
    clock = 0.0
    for index in range(workload.sessions):
        # Superposed Poisson processes: exponential gaps at the total rate, tenant drawn by its share.
        if index:
            clock += rng.expovariate(total_rate)
        tenant = rng.choices(range(len(rates)), weights=rates)[0]
        session = f"s{index:05d}"
        context = workload.system_prompt_tokens
        arrival = clock
        for turn in range(rng.randint(workload.min_turns, workload.max_turns)):
            think = rng.expovariate(1.0 / workload.think_time) if turn and workload.think_time > 0 else 0.0
            arrival += think
            user_len = _around(rng, workload.user_tokens, workload.range_ratio)
            output_len = _around(rng, workload.output_tokens, workload.range_ratio)
            user: ChatMessage = ("user", synthesize_text(user_len, derive_seed(workload.seed, session, turn)))
            system = system_prompts[tenant]
            messages: tuple[ChatMessage, ...] = (("system", system), user) if turn == 0 and system else (user,)
            context += user_len
            requests.append(
                TraceRequest(
                    arrival=arrival,
                    input_length=context,
                    output_length=output_len,
                    tenant=names[tenant],
                    session_id=session,
                    turn=turn,
                    think_time=think,
                    messages=messages,
                )
            )
            context += output_len
    requests.sort(key=lambda r: r.arrival)
    return requests
