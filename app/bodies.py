"""Reading a submit body the way the gateway and DashScope must agree on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

OSS_SCHEME = "oss://"


class DuplicateKey(ValueError):
    """A JSON object in the body names the same member twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def loads_unique(raw: bytes) -> Any:
    """Parse JSON, refusing any object that repeats a key."""
    # Parsers disagree on which of two equal keys wins: the gateway would check one model or URL
    # and DashScope act on the other, so neither may be chosen.
    return json.loads(raw, object_pairs_hook=_unique_object)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def oss_urls(value: Any, path: str = "input") -> Iterator[tuple[str, str]]:
    """Yield (field path, url) for every `oss://` string anywhere in a value."""
    if isinstance(value, str):
        if value.startswith(OSS_SCHEME):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from oss_urls(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from oss_urls(item, f"{path}[{index}]")
