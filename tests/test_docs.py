"""The configuration examples users copy: each loads, and prices every model it serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.S)


def complete_examples() -> list[tuple[str, str]]:
    """Return every TOML block of README.md and docs/ that defines channels, with its file."""
    examples = [("config/simulator.toml", (REPO_ROOT / "config/simulator.toml").read_text())]
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for block in TOML_BLOCK.findall(path.read_text()):
            if "[[channels]]" in block:
                examples.append((str(path.relative_to(REPO_ROOT)), block))
    return examples


@pytest.mark.parametrize(("source", "toml"), complete_examples(), ids=lambda v: v[:40])
def test_example_loads_and_prices_every_model_it_serves(
    source: str, toml: str, tmp_path: Path
) -> None:
    path = tmp_path / "example.toml"
    path.write_text(toml)
    keys = {name: "sk-example" for name in re.findall(r'api_key_env = "([A-Z_]+)"', toml)}
    settings = load_settings({"GATEWAY_CONFIG": str(path), **keys})
    served = {model for channel in settings.channels for model in channel.models}
    assert served, source
    assert served <= set(settings.prices), f"{source} serves models without a price"


def test_docs_hold_the_full_configuration_example() -> None:
    # The reference must stay findable: the README links it, and it holds channels.
    sources = [source for source, _ in complete_examples()]
    assert "docs/configuration.md" in sources
