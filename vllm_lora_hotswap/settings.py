"""All configuration of an engine instance, read from ``VLLM_HOTSWAP_*`` variables.

One typed object, parsed once per process. A bad value is a :class:`ConfigError`
that names the variable and says what is wrong; nothing starts half-configured.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "VLLM_HOTSWAP_"


class ConfigError(ValueError):
    """A ``VLLM_HOTSWAP_*`` variable holds a value that cannot be used."""


class HotSwapSettings(BaseSettings):
    """Per-instance settings. Field ``x`` is read from ``VLLM_HOTSWAP_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    root: Path | None = Field(
        default=None,
        description="Checkpoint store root. Unset: the plugin stays inactive.",
    )
    adapters: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("*",),
        description="Comma-separated adapter names or globs this instance serves.",
    )
    poll_interval: float = Field(default=5.0, gt=0, le=3600, description="Seconds between polls of the store.")
    events: bool = Field(
        default=True,
        description="Also react to file-system events (inotify) between polls.",
    )
    notices: bool = Field(
        default=True,
        description="Accept publishers' notices (POST /v1/lora/notify, with the --api-key if the server has one): "
        "a hint to read the store at once, as across nodes no file-system event arrives. The store decides; "
        "a notice is never trusted.",
    )
    probe: bool = Field(default=True, description="Run a short greedy generation on a new version before serving it.")
    probe_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="Prompt text of the probe generation (unset: one token, the tokenizer's BOS).",
    )
    probe_max_tokens: int = Field(
        default=1, ge=1, le=64, description="Tokens the probe generates (one is a full prefill and a sampled token)."
    )
    probe_hold: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Seconds a request for an adapter may wait while the adapter's new version is probed, "
        "to be served by it if it passes (0: such requests go to the version serving now).",
    )
    mode: Literal["versioned", "inplace"] = Field(
        default="versioned",
        description="versioned: each request runs on one version; inplace: new weights take "
        "over in-flight requests at the next step.",
    )
    instance_id: str | None = Field(
        default=None, description="Name of this instance in the store (default: host:port)."
    )
    retire_grace: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a replaced version stays installed after the switch, on top of "
        "waiting for its in-flight requests.",
    )
    control_routes_without_key: bool = Field(
        default=False,
        description="Mount the base-weight control routes on a non-loopback address without --api-key "
        "(trusted networks only; by default such a server refuses to start).",
    )
    max_parallel: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Adapters whose swaps progress at the same time (one swap per adapter at a time).",
    )
    stage_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a version may take to stage before it fails."
    )
    idle_spin: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Seconds an idle vLLM engine core or worker keeps busy-polling its queue before it sleeps "
        "(unset: vLLM's own 1 s). Short values give a trainer or other engines on the same cores their CPU back "
        "between steps.",
    )

    @field_validator("adapters", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        if isinstance(value, str):
            patterns = tuple(p.strip() for p in value.split(",") if p.strip())
            if not patterns:
                raise ValueError("must name at least one adapter or glob (default '*')")
            return patterns
        return value

    @field_validator("root", mode="before")
    @classmethod
    def _empty_root_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def active(self) -> bool:
        return self.root is not None

    def serves(self, adapter: str) -> bool:
        """Whether this instance follows ``adapter`` (``VLLM_HOTSWAP_ADAPTERS``)."""
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


def load_settings(**overrides: object) -> HotSwapSettings:
    """Read the settings from the environment, with ``overrides`` taking precedence.

    Raises:
        ConfigError: one line per bad variable, each naming it and the reason.
    """
    try:
        return HotSwapSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            value = error.get("input")
            lines.append(f"{ENV_PREFIX}{field.upper()}={value!r}: {error['msg']}")
        raise ConfigError("invalid hot-swap configuration: " + "; ".join(lines)) from None
