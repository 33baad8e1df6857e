"""Engine profiles: a model on a GPU, as the batch limits, KV capacity and step-time coefficients.

Built-in profiles live as YAML next to this module; users add their own by passing a YAML path
wherever a profile name is accepted.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

_BUILTIN_DIR = Path(__file__).with_name("profiles")


class StepTimeCoefficients(BaseModel):
    """Coefficients of ``t = max(T_w, t0 + a·N) + b·C + c·A + t_oh + d·B`` in milliseconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight_floor_ms: float = Field(ge=0, description="T_w: weight-streaming floor of the linear layers")
    linear_base_ms: float = Field(ge=0, description="t0: intercept of the compute-bound linear term")
    linear_ms_per_token: float = Field(ge=0, description="a: per scheduled token")
    attn_ms_per_context_token: float = Field(ge=0, description="b: per context token read by attention")
    attn_ms_per_prefill_unit: float = Field(ge=0, description="c: per unit of causal prefill attention")
    step_overhead_ms: float = Field(ge=0, description="t_oh: scheduler and launch overhead per step")
    seq_overhead_ms: float = Field(ge=0, description="d: per scheduled sequence")


class EngineProfile(BaseModel):
    """Everything about a replica's hardware and engine configuration that shapes its timing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    model: str = Field(description="default served model name")
    max_model_len: int = Field(gt=0)
    block_size: int = Field(default=16, gt=0)
    num_gpu_blocks: int = Field(gt=0)
    max_num_batched_tokens: int = Field(gt=0)
    max_num_seqs: int = Field(gt=0)
    enable_chunked_prefill: bool = Field(
        default=True,
        description="False: vLLM V0's prefill-prioritising scheduler (whole prompts, prefill-only steps stall decodes)",
    )
    step_time: StepTimeCoefficients
    frontend_overhead_ms: float = Field(default=10.0, ge=0, description="per-request API overhead")
    jitter: float = Field(default=0.0, ge=0, le=0.5, description="relative std-dev of step-time noise")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


def builtin_profile_names() -> list[str]:
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.yaml"))


def _parse(path: Path) -> EngineProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read engine profile {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"engine profile {path} must be a YAML mapping")
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid engine profile {path}:\n{exc}") from exc


@cache
def load_profile(name_or_path: str) -> EngineProfile:
    """A built-in profile by name, or a profile from a YAML file path."""
    builtin = _BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return _parse(builtin)
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return _parse(path)
    raise ValueError(
        f"unknown engine profile {name_or_path!r}: not a built-in ({', '.join(builtin_profile_names())}) "
        "nor a readable .yaml file"
    )
