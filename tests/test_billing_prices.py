"""Prices, estimates and charges: exact decimals from every way a body or a usage says it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from app.billing.prices import (
    Estimate,
    ModelPricing,
    NotEstimable,
    UnpricedTier,
    charge_from_usage,
    estimate,
    tier_of_size,
    to_cent,
)
from app.config import ConfigError, load_settings

WAN = ModelPricing({"480P": Decimal("0.34"), "720P": Decimal("0.6"), "1080P": Decimal("1")})


@pytest.mark.parametrize(
    ("parameters", "tier", "seconds", "amount"),
    [
        (None, "480P", Decimal(5), Decimal("1.70")),
        ({}, "480P", Decimal(5), Decimal("1.70")),
        ({"duration": 10}, "480P", Decimal(10), Decimal("3.40")),
        ({"resolution": "720P"}, "720P", Decimal(5), Decimal("3.00")),
        ({"resolution": "720p", "duration": 3}, "720P", Decimal(3), Decimal("1.80")),
        ({"resolution": "1080"}, "1080P", Decimal(5), Decimal("5")),
        ({"size": "1280*720"}, "720P", Decimal(5), Decimal("3.00")),
        ({"size": "720*1280"}, "720P", Decimal(5), Decimal("3.00")),
        ({"size": "1920*1080", "duration": 2}, "1080P", Decimal(2), Decimal("2")),
        ({"size": "832*480"}, "480P", Decimal(5), Decimal("1.70")),
        # The resolution wins over the size when a body names both.
        ({"resolution": "480P", "size": "1920*1080"}, "480P", Decimal(5), Decimal("1.70")),
    ],
)
def test_the_estimate_reads_resolution_size_and_duration(
    parameters: dict[str, Any] | None, tier: str, seconds: Decimal, amount: Decimal
) -> None:
    assert estimate(WAN, parameters) == Estimate(tier, seconds, amount)


@pytest.mark.parametrize(
    ("size", "tier"),
    [("624*624", "480P"), ("960*960", "720P"), ("1088*832", "720P"), ("1440*1440", "1080P")],
)
def test_a_size_without_a_tier_side_is_the_tier_nearest_in_pixels(size: str, tier: str) -> None:
    assert tier_of_size(size) == tier


def test_the_model_defaults_apply_when_the_body_names_neither() -> None:
    pricing = ModelPricing(WAN.price_per_second, Decimal(4), "720P")

    assert estimate(pricing, {}) == Estimate("720P", Decimal(4), Decimal("2.4"))


@pytest.mark.parametrize(
    ("parameters", "field", "tier"),
    [
        ({"resolution": "1080P"}, "parameters.resolution", "1080P"),
        ({"resolution": "4K"}, "parameters.resolution", "4K"),
        ({"size": "1920*1080"}, "parameters.size", "1080P"),
    ],
)
def test_an_unpriced_tier_names_the_field_and_the_priced_tiers(
    parameters: dict[str, Any], field: str, tier: str
) -> None:
    pricing = ModelPricing({"720P": Decimal("0.6"), "480P": Decimal("0.3")})

    with pytest.raises(UnpricedTier) as error:
        estimate(pricing, parameters)

    assert str(error.value).startswith(f"{field}: the resolution {tier} has no price")
    assert str(error.value).endswith("priced tiers: 480P, 720P.")


RESERVED = Estimate("480P", Decimal(5), Decimal("1.70"))


@pytest.mark.parametrize(
    ("usage", "amount", "seconds", "tier"),
    [
        ({"duration": 4.5, "SR": 480, "video_count": 1}, Decimal("1.53"), Decimal("4.5"), "480P"),
        ({"duration": 5, "SR": "720"}, Decimal("3.0"), Decimal(5), "720P"),
        (
            {"video_duration": 2.25, "video_ratio": "16:9"},
            Decimal("0.765"),
            Decimal("2.25"),
            "480P",
        ),
        (
            {"output_video_duration": 10, "input_video_duration": 3, "SR": 1080},
            Decimal(10),
            Decimal(10),
            "1080P",
        ),
    ],
)
def test_a_charge_is_what_usage_reports(
    usage: dict[str, Any], amount: Decimal, seconds: Decimal, tier: str
) -> None:
    charge = charge_from_usage(WAN, usage, RESERVED, "t-1")

    assert (charge.amount, charge.seconds, charge.tier, charge.from_usage) == (
        amount,
        seconds,
        tier,
        True,
    )


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {},
        {"duration": "long"},
        {"duration": True},
        {"duration": 5, "SR": "540"},
        # A hostile or broken answer: more video than any task makes, or none that is a number.
        {"duration": 10**30, "SR": 480},
        {"duration": "NaN"},
        {"duration": -3},
    ],
)
def test_unreadable_usage_charges_the_estimate_and_says_so(
    usage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        charge = charge_from_usage(WAN, usage, RESERVED, "t-odd")

    assert (charge.amount, charge.from_usage) == (Decimal("1.70"), False)
    [record] = [
        r for r in caplog.records if r.getMessage() == "usage unreadable, charged the estimate"
    ]
    assert record.task_id == "t-odd"  # type: ignore[attr-defined]


@pytest.mark.parametrize("duration", [0, -5, 3601, 10**23, "abc", "NaN", 1e400])
def test_a_duration_no_video_has_is_not_estimable(duration: Any) -> None:
    with pytest.raises(NotEstimable) as error:
        estimate(WAN, {"duration": duration})

    assert str(error.value).startswith("parameters.duration: ")


def test_amounts_are_shown_to_the_cent() -> None:
    assert to_cent(Decimal("1.53")) == "1.53"
    assert to_cent(Decimal("0.765")) == "0.77"
    assert to_cent(Decimal(2)) == "2.00"


CONFIG = """
[billing]
currency = "USD"

[models."m".price_per_second]
"480P" = 0.34
"720P" = "0.60"

[models."n"]
default_duration = 4
default_resolution = "1080P"

[models."n".price_per_second]
"720P" = 1
"1080P" = "1.5"
"""


def test_prices_are_exact_whether_written_as_numbers_or_strings(
    write_config: Callable[[str], str],
) -> None:
    settings = load_settings({"GATEWAY_CONFIG": write_config(CONFIG)})

    assert settings.currency == "USD"
    m, n = settings.pricing["m"], settings.pricing["n"]
    assert m.price_per_second == {"480P": Decimal("0.34"), "720P": Decimal("0.60")}
    assert all(type(price) is Decimal for price in m.price_per_second.values())
    assert (m.default_duration, m.default_tier) == (Decimal(5), "480P")
    assert (n.default_duration, n.default_tier) == (Decimal(4), "1080P")
    assert settings.offered_models == frozenset()  # no channel serves them
    assert load_settings({}).currency == "CNY"


@pytest.mark.parametrize(
    ("text", "expected", "model_keys"),
    [
        ('"480P" = -0.1', "models.m.price_per_second.480P: Must be greater than or equal to 0", ""),
        ('"480P" = "abc"', "models.m.price_per_second.480P: Not a valid number", ""),
        ('"480P" = true', "models.m.price_per_second.480P: Not a valid number", ""),
        ('"480P" = "nan"', "models.m.price_per_second.480P:", ""),
        ('"480P" = 1', "models.m.default_duration: Must be greater than 0", "default_duration = 0"),
        (
            '"480P" = 1',
            "models.m.default_resolution: 720P has no price",
            'default_resolution = "720P"',
        ),
    ],
)
def test_a_bad_price_is_refused_naming_its_key(
    write_config: Callable[[str], str], text: str, expected: str, model_keys: str
) -> None:
    path = write_config(f'[models."m"]\n{model_keys}\n[models."m".price_per_second]\n{text}\n')

    with pytest.raises(ConfigError) as error:
        load_settings({"GATEWAY_CONFIG": path})

    assert expected in str(error.value)
