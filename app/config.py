"""The one place that reads the environment and the TOML configuration file."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from app.billing.prices import DEFAULT_DURATION, RESOLUTION_TIERS, ModelPricing
from app.schemas import first_error

__all__ = ["RESOLUTION_TIERS", "Channel", "ConfigError", "Settings", "load_settings"]
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
# DashScope's answers are a few kilobytes; a task list of 100 tasks some tens.
DEFAULT_MAX_ANSWER_BYTES = 1024 * 1024


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Channel:
    """One upstream DashScope account: its key, its region's origin and the models it serves."""

    name: str
    base_url: str
    api_key: str = field(repr=False)
    models: frozenset[str]
    workspace: str | None = None
    priority: int = 0
    weight: int = 1


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its configuration, validated once at start-up."""

    database_url: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    query_retries: int = 2
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds a client has to send a request body, from the first read of it to the last.
    body_timeout: float = 60.0
    key_cache_seconds: float = 5.0
    final_task_cache_size: int = 10_000
    # Requests each worker works on at once (0: no limit); see app/turns.py.
    requests_at_once: int = 2
    # getPolicy calls a second per gateway key, across every worker and instance.
    upload_policies_per_second: int = 20
    refresh_interval: float = 3.0
    retention_hours: float = 24.0
    # How long a task DashScope accepted is retried into the database before it is journaled.
    record_retry_seconds: float = 30.0
    # The local journal of accepted tasks the database refused; None: in the instance folder.
    journal_path: str | None = None
    # Seconds between reconciler passes in the service; 0 turns the in-service loop off.
    reconcile_interval: float = 30.0
    # Upstream queries a reconciler pass makes per channel and second (DashScope allows 20).
    reconcile_queries_per_second: float = 5.0
    # How long after a submit was sent DashScope may still create its task (read timeouts
    # included); past it, a submission with no task in the channel's listing created nothing.
    adoption_window_seconds: float = 300.0
    pool_size: int = 10
    max_overflow: int = 10
    channels: tuple[Channel, ...] = ()
    prices: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)
    # Prices and defaults of each model, exact (app/billing/prices.py).
    pricing: Mapping[str, ModelPricing] = field(default_factory=dict)
    # The unit prices, limits and reports are in.
    currency: str = "CNY"

    @property
    def offered_models(self) -> frozenset[str]:
        """Return the models that have a price and at least one channel serving them."""
        served = {model for channel in self.channels for model in channel.models}
        return frozenset(served & set(self.prices))


class _StrictSchema(Schema):
    """A config section: a key it does not know is an error that lists the keys it does."""

    class Meta:
        unknown = EXCLUDE  # reported by _reject_unknown_keys, with the keys expected

    @validates_schema(pass_original=True)
    def _reject_unknown_keys(self, _data: Any, original: Any, **_kwargs: Any) -> None:
        if not isinstance(original, dict):
            return
        unknown = sorted(set(original) - set(self.fields))
        if unknown:
            expected = ", ".join(self.fields)
            raise ValidationError(f"unknown key {unknown[0]!r}; expected one of: {expected}")


class _UpstreamSection(_StrictSchema):
    connect_timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    read_timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    query_retries = fields.Integer(strict=True, validate=validate.Range(min=0, max=10))
    max_answer_bytes = fields.Integer(strict=True, validate=validate.Range(min=1024))


class _ServerSection(_StrictSchema):
    max_body_bytes = fields.Integer(strict=True, validate=validate.Range(min=1024))
    body_timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    key_cache_seconds = fields.Float(validate=validate.Range(min=0))
    final_task_cache_size = fields.Integer(strict=True, validate=validate.Range(min=0))
    requests_at_once = fields.Integer(strict=True, validate=validate.Range(min=0))
    upload_policies_per_second = fields.Integer(strict=True, validate=validate.Range(min=1))


class _TasksSection(_StrictSchema):
    refresh_interval = fields.Float(validate=validate.Range(min=0))
    retention_hours = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    record_retry_seconds = fields.Float(validate=validate.Range(min=0))
    journal_path = fields.String(validate=validate.Length(min=1))
    reconcile_interval = fields.Float(validate=validate.Range(min=0))
    reconcile_queries_per_second = fields.Float(
        validate=validate.Range(min=0, min_inclusive=False, max=20)
    )
    adoption_window_seconds = fields.Float(validate=validate.Range(min=1))


class _DatabaseSection(_StrictSchema):
    pool_size = fields.Integer(strict=True, validate=validate.Range(min=1))
    max_overflow = fields.Integer(strict=True, validate=validate.Range(min=0))


class _ChannelSection(_StrictSchema):
    name = fields.String(required=True, validate=validate.Length(min=1))
    base_url = fields.Url(required=True, schemes={"http", "https"}, require_tld=False)
    api_key_env = fields.String(required=True, validate=validate.Length(min=1))
    models = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    workspace = fields.String()
    priority = fields.Integer(strict=True)
    weight = fields.Integer(strict=True, validate=validate.Range(min=1))


class _Money(fields.Decimal):
    """An exact amount written as a TOML number or a decimal string ("0.30")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class _ModelSection(_StrictSchema):
    price_per_second = fields.Dict(
        keys=fields.String(validate=validate.OneOf(RESOLUTION_TIERS)),
        values=_Money(validate=validate.Range(min=0)),
        required=True,
        validate=validate.Length(min=1),
    )
    default_duration = _Money(validate=validate.Range(min=0, min_inclusive=False))
    default_resolution = fields.String(validate=validate.OneOf(RESOLUTION_TIERS))


class _BillingSection(_StrictSchema):
    currency = fields.String(validate=validate.Length(min=1, max=16))


class _ConfigFile(_StrictSchema):
    upstream = fields.Nested(_UpstreamSection)
    server = fields.Nested(_ServerSection)
    tasks = fields.Nested(_TasksSection)
    database = fields.Nested(_DatabaseSection)
    channels = fields.List(fields.Nested(_ChannelSection))
    models = fields.Dict(keys=fields.String(), values=fields.Nested(_ModelSection))
    billing = fields.Nested(_BillingSection)


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            # Decimals, not binary floats: a price written 0.34 is exactly 0.34.
            raw = tomllib.load(handle, parse_float=Decimal)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        loaded: dict[str, Any] = _ConfigFile().load(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc.messages)}") from None
    return loaded


def _build_channels(
    path: str, sections: list[dict[str, Any]], environ: Mapping[str, str]
) -> tuple[Channel, ...]:
    channels: list[Channel] = []
    for index, section in enumerate(sections):
        where = f"{path}: channels[{index}]"
        if section["name"] in {channel.name for channel in channels}:
            raise ConfigError(f"{where}.name: duplicate channel name {section['name']!r}")
        api_key = environ.get(section["api_key_env"], "")
        if not api_key:
            raise ConfigError(
                f"{where}.api_key_env: environment variable {section['api_key_env']} "
                "is not set (it must hold the channel's DashScope key)"
            )
        channels.append(
            Channel(
                name=section["name"],
                base_url=section["base_url"].rstrip("/"),
                api_key=api_key,
                models=frozenset(section["models"]),
                workspace=section.get("workspace"),
                priority=section.get("priority", 0),
                weight=section.get("weight", 1),
            )
        )
    return tuple(channels)


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read the environment and the TOML file it names into validated Settings."""
    path = environ.get("GATEWAY_CONFIG") or None
    database_url = environ.get("GATEWAY_DATABASE_URL") or None
    if path is None:
        return Settings(database_url=database_url)
    data = _read_file(path)
    # Section keys are named as Settings fields, so each validated section maps straight on.
    scalars = {
        name: value
        for section in ("upstream", "server", "tasks", "database")
        for name, value in data.get(section, {}).items()
    }
    pricing = _build_pricing(path, data.get("models", {}))
    return Settings(
        database_url=database_url,
        **scalars,
        channels=_build_channels(path, data.get("channels", []), environ),
        prices={model: dict(p.price_per_second) for model, p in pricing.items()},
        pricing=pricing,
        currency=data.get("billing", {}).get("currency", "CNY"),
    )


def _build_pricing(path: str, sections: Mapping[str, Any]) -> dict[str, ModelPricing]:
    pricing: dict[str, ModelPricing] = {}
    for model, section in sections.items():
        prices = dict(section["price_per_second"])
        default = section.get("default_resolution")
        if default is not None and default not in prices:
            raise ConfigError(
                f"{path}: models.{model}.default_resolution: {default} has no price; "
                f"priced: {', '.join(sorted(prices))}"
            )
        pricing[model] = ModelPricing(
            price_per_second=prices,
            default_duration=section.get("default_duration", DEFAULT_DURATION),
            default_resolution=default,
        )
    return pricing
