"""Prices, estimates and charges: pure functions over exact decimals, never floats."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

log = logging.getLogger(__name__)

RESOLUTION_TIERS = ("480P", "720P", "1080P")
# The pixel count each tier's 16:9 size has: an odd `size` is the tier nearest in pixels.
TIER_PIXELS = {"480P": 832 * 480, "720P": 1280 * 720, "1080P": 1920 * 1080}
TIER_SIDES = {480: "480P", 720: "720P", 1080: "1080P"}
DEFAULT_DURATION = Decimal(5)
# What the database keeps (Numeric(18, 6)); shown to the cent.
STORED = Decimal("0.000001")
CENT = Decimal("0.01")
SIZE = re.compile(r"\s*(\d+)\s*[*xX\u00d7]\s*(\d+)\s*")
# The usage keys DashScope's model families name the seconds of output video with.
# The longest video one task may be estimated or charged for: far above any DashScope model's
# (15 s today), and what keeps every amount inside the ledger's NUMERIC(18, 6).
MAX_VIDEO_SECONDS = 3600
USAGE_SECONDS_KEYS = ("output_video_duration", "video_duration", "duration")


@dataclass(frozen=True)
class ModelPricing:
    """A model's price per second of output video by resolution tier, and its defaults."""

    price_per_second: Mapping[str, Decimal]
    default_duration: Decimal = DEFAULT_DURATION
    default_resolution: str | None = None

    @property
    def default_tier(self) -> str:
        """Return the tier of a body that names none: the configured one, else the cheapest."""
        if self.default_resolution is not None:
            return self.default_resolution
        return min(self.price_per_second, key=lambda tier: (self.price_per_second[tier], tier))


@dataclass(frozen=True)
class Estimate:
    """What one submit is expected to cost: tier, seconds and their price."""

    tier: str
    seconds: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Charge:
    """What a finished task costs, from DashScope's `usage` (or the estimate, as a fallback)."""

    tier: str
    seconds: Decimal
    amount: Decimal
    from_usage: bool


class NotEstimable(ValueError):
    """A submit whose estimate cannot be made: the message names the field and why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


class UnpricedTier(NotEstimable):
    """A submit names a resolution the model has no price for."""

    def __init__(self, field: str, tier: str, priced: list[str]) -> None:
        self.tier = tier
        self.priced = priced
        super().__init__(
            field,
            f"the resolution {tier} has no price for this model; "
            f"priced tiers: {', '.join(priced)}.",
        )


def exact(value: Any) -> Decimal:
    """Return a number (int, Decimal, float or decimal string) as the Decimal it is written as."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    # A float goes through its shortest repr, so 0.34 is 0.34 and not its binary neighbour.
    try:
        number = Decimal(str(value).strip()) if isinstance(value, str | float) else Decimal(value)
    except (InvalidOperation, TypeError):
        raise ValueError("not a number") from None
    if not number.is_finite():
        raise ValueError("not a finite number")
    return number


def stored(amount: Decimal) -> Decimal:
    """Return an amount at the precision the database keeps (six places, half up)."""
    return amount.quantize(STORED, rounding=ROUND_HALF_UP)


def to_cent(amount: Decimal) -> str:
    """Return an amount as shown to people and in headers: to the cent."""
    return str(amount.quantize(CENT, rounding=ROUND_HALF_UP))


def tier_of_resolution(value: Any) -> str | None:
    """Return the tier a `resolution` names ("720P", "720p", "720", 720), or None if odd."""
    text = str(value).strip().upper().removesuffix("P")
    return f"{int(text)}P" if text.isdigit() else None


def tier_of_size(value: Any) -> str | None:
    """Return the tier of a `size` ("1280*720"): its shorter side, else the nearest in pixels."""
    match = SIZE.fullmatch(str(value))
    if match is None:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    side = TIER_SIDES.get(min(width, height))
    if side is not None:
        return side
    # Squares and other aspect ratios (624*624 is 480P, 960*960 720P, 1440*1440 1080P).
    pixels = width * height
    return min(TIER_PIXELS, key=lambda tier: abs(TIER_PIXELS[tier] - pixels))


def estimate(pricing: ModelPricing, parameters: Mapping[str, Any] | None) -> Estimate:
    """Return a submit's estimate: price of its tier times its seconds (or the defaults)."""
    parameters = parameters or {}
    field, tier = "", pricing.default_tier
    if parameters.get("resolution") not in (None, ""):
        field = "parameters.resolution"
        tier = tier_of_resolution(parameters["resolution"]) or str(parameters["resolution"])
    elif parameters.get("size") not in (None, ""):
        field = "parameters.size"
        tier = tier_of_size(parameters["size"]) or str(parameters["size"])
    price = pricing.price_per_second.get(tier)
    if price is None:
        raise UnpricedTier(field or "parameters.resolution", tier, sorted_tiers(pricing))
    seconds = pricing.default_duration
    duration = parameters.get("duration")
    if duration is not None:
        try:
            seconds = exact(duration)
        except ValueError:
            raise NotEstimable("parameters.duration", "not a number.") from None
        # Every service path's body is estimated, not only those whose schema bounds it.
        if not 0 < seconds <= MAX_VIDEO_SECONDS:
            raise NotEstimable(
                "parameters.duration", f"must be more than 0 and at most {MAX_VIDEO_SECONDS}."
            )
    return Estimate(tier=tier, seconds=seconds, amount=stored(price * seconds))


def sorted_tiers(pricing: ModelPricing) -> list[str]:
    """Return the model's priced tiers, lowest resolution first."""
    return sorted(pricing.price_per_second, key=lambda tier: int(tier.removesuffix("P")))


def charge_from_usage(
    pricing: ModelPricing | None, usage: Any, reserved: Estimate, task_id: str
) -> Charge:
    """Return what a SUCCEEDED task costs by its `usage`; the estimate if usage says too little."""
    seconds = _usage_seconds(usage)
    tier = _usage_tier(usage)
    if pricing is not None and seconds is not None:
        tier = tier or reserved.tier
        price = pricing.price_per_second.get(tier)
        if price is not None:
            return Charge(tier, seconds, stored(price * seconds), from_usage=True)
    log.warning(
        "usage unreadable, charged the estimate",
        extra={"task_id": task_id, "seconds": str(seconds), "tier": tier},
    )
    return Charge(reserved.tier, reserved.seconds, reserved.amount, from_usage=False)


def _usage_seconds(usage: Any) -> Decimal | None:
    if not isinstance(usage, dict):
        return None
    for key in USAGE_SECONDS_KEYS:
        value = usage.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            seconds = exact(value)
        except ValueError:
            continue
        if 0 <= seconds <= MAX_VIDEO_SECONDS:
            return seconds
    return None


def _usage_tier(usage: Any) -> str | None:
    if not isinstance(usage, dict):
        return None
    value = usage.get("SR")
    if value is None or isinstance(value, bool):
        return None
    return tier_of_resolution(value)
