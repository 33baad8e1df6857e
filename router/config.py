"""Router configuration: defaults < YAML file (``--config``) < ``FLEETROUTE_*`` environment < flags.

An invalid value stops startup with a message that names the field.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.routing import available_routing_policies
from policies.scheduling import available_scheduling_policies
from router.discovery.base import REPLICA_KINDS

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fleetroute_config_file", default=None)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending field(s)."""


class HealthSettings(BaseModel):
    """Active health checks and passive outlier ejection."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=2.0, gt=0, description="seconds between active checks of each replica")
    timeout_s: float = Field(default=1.0, gt=0, description="a check slower than this fails")
    unhealthy_threshold: int = Field(default=2, ge=1, description="consecutive failed checks to mark unhealthy")
    healthy_threshold: int = Field(default=1, ge=1, description="consecutive passed checks to mark healthy")
    eject_after_failures: int = Field(
        default=3, ge=1, description="consecutive request failures (connect error, 5xx, timeout) that eject a replica"
    )
    ejection_s: float = Field(default=5.0, gt=0, description="first ejection length; doubles on repeat, capped")
    max_ejection_s: float = Field(default=60.0, gt=0)


class TimeoutSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connect_s: float = Field(default=2.0, gt=0, description="TCP connect to a replica")
    first_byte_s: float = Field(
        default=300.0, gt=0, description="until response headers (non-streaming replies arrive whole)"
    )
    inter_chunk_s: float = Field(default=60.0, gt=0, description="between two chunks of a streamed reply")


class RouterSettings(BaseSettings):
    """Everything ``fleetroute serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="FLEETROUTE_", env_nested_delimiter="__", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    admin_host: str = "127.0.0.1"
    admin_port: int | None = Field(default=8081, ge=0, le=65535, description="None disables; 0 picks a free port")
    admin_token: SecretStr | None = Field(default=None, description="bearer token the admin API requires")

    replicas: list[str] = Field(default_factory=list, description="static replicas: URL[,kind=K][,group=G]")
    replica_kind: str = Field(default="vllm", description="engine kind of discovered replicas")
    dns_service: str | None = None
    dns_port: int = Field(default=8000, ge=1, le=65535)
    dns_interval_s: float = Field(default=10.0, gt=0)
    k8s_service: str | None = None
    k8s_namespace: str | None = None
    k8s_port_name: str | None = None

    policy: str = "default"
    policy_params: dict[str, Any] = Field(default_factory=dict)
    #: Engine-level scheduling policy per replica group, e.g. {"default": "priority"}.
    engine_schedulers: dict[str, str] = Field(default_factory=dict)

    scrape_interval_s: float = Field(default=1.0, gt=0, description="seconds between /metrics scrapes of a replica")
    health: HealthSettings = Field(default_factory=HealthSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    max_attempts: int = Field(default=3, ge=1, description="tries per request across replicas, before any byte")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    prefix_block_bytes: int = Field(default=256, ge=16, description="bytes of prompt per prefix-index block")
    prefix_index_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    bytes_per_token: float = Field(default=4.0, gt=0, description="initial prompt bytes per token estimate")
    default_max_tokens: int = Field(default=256, ge=1, description="decode tokens assumed when max_tokens is absent")

    redis_url: SecretStr | None = Field(
        default=None,
        description="shared state store (docs/state.md): redis://, rediss://, redis+sentinel://, redis+cluster://",
    )
    fleet: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="routers with the same fleet name share state (Redis key namespace fleetroute:{fleet}:)",
    )
    state_sync_interval_s: float = Field(
        default=0.1, gt=0, le=10, description="seconds between load syncs with the state store"
    )
    state_publish_interval_s: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="least time between two pushes of load changes and prefix records to the other routers",
    )
    state_ttl_s: float = Field(
        default=3.0, gt=0, description="a dead router's load, heartbeat and scrape leases expire after this"
    )
    redis_prefix_max_entries: int = Field(
        default=262_144, ge=1, description="budget of the shared prefix index in Redis, in (block, replica) entries"
    )
    state_session_ttl_s: float = Field(default=3600.0, gt=0, description="session bindings expire after this")
    state_tenant_window_s: float = Field(default=60.0, gt=0, description="window of the per-tenant token counters")
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in available_routing_policies():
            raise ValueError(f"unknown routing policy {value!r}; available: {', '.join(available_routing_policies())}")
        return value

    @field_validator("replica_kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in REPLICA_KINDS:
            raise ValueError(f"unknown replica kind {value!r}; expected one of {', '.join(REPLICA_KINDS)}")
        return value

    @field_validator("engine_schedulers")
    @classmethod
    def _known_schedulers(cls, value: dict[str, str]) -> dict[str, str]:
        for group, name in value.items():
            if name not in available_scheduling_policies():
                known = ", ".join(available_scheduling_policies())
                raise ValueError(f"group {group!r}: unknown engine scheduler {name!r}; available: {known}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return upper

    @model_validator(mode="after")
    def _one_discovery(self) -> RouterSettings:
        modes = [bool(self.replicas), self.dns_service is not None, self.k8s_service is not None]
        if sum(modes) > 1:
            raise ValueError("choose one discovery mode: replicas, dns_service or k8s_service")
        if self.admin_port is not None and self.admin_port == self.port and self.port != 0:
            raise ValueError("admin_port must differ from port")
        if self.state_ttl_s < 3 * self.state_sync_interval_s:
            raise ValueError("state_ttl_s must be at least 3 x state_sync_interval_s, or live routers' load expires")
        if self.redis_url is not None:
            from router.state.connect import validate_redis_url

            try:
                validate_redis_url(self.redis_url.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"redis_url: {exc}") from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls))


class _YamlFileSource(PydanticBaseSettingsSource):
    """The ``--config`` YAML file, lowest precedence after the defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping")
        return data


def load_settings(overrides: dict[str, Any] | None = None, config_file: Path | None = None) -> RouterSettings:
    """Build settings from flags (``overrides``, None values ignored), environment and YAML."""
    token = _config_file.set(config_file)
    try:
        return RouterSettings(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _config_file.reset(token)


def format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(settings)"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)
