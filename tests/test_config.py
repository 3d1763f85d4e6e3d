"""The TOML configuration: what it offers, and how it refuses a mistake at start-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError, load_settings
from tests.conftest import BASE_CONFIG, INTL_UPSTREAM_KEY, PRIMARY_UPSTREAM_KEY

ENV = {"PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY, "INTL_UPSTREAM_KEY": INTL_UPSTREAM_KEY}


def test_base_config_offers_priced_and_served_models(write_config: Callable[[str], str]) -> None:
    settings = load_settings({"GATEWAY_CONFIG": write_config(BASE_CONFIG), **ENV})

    assert settings.offered_models == {"wan2.5-t2v-preview", "wanx2.1-kf2v-plus", "wan2.2-t2v-plus"}
    assert [c.name for c in settings.channels] == ["primary", "intl"]
    assert settings.channels[0].api_key == PRIMARY_UPSTREAM_KEY
    assert PRIMARY_UPSTREAM_KEY not in repr(settings)
    assert (settings.connect_timeout, settings.read_timeout) == (2, 5)


def test_defaults_without_a_config_file() -> None:
    settings = load_settings({})

    assert settings.channels == ()
    assert settings.offered_models == frozenset()
    assert settings.max_body_bytes == 20 * 1024 * 1024
    assert settings.max_answer_bytes == 1024 * 1024
    assert settings.body_timeout == 60
    assert settings.refresh_interval == 3


def test_max_answer_bytes_reaches_the_upstream_client(
    write_config: Callable[[str], str], tmp_path: Path
) -> None:
    path = write_config("[upstream]\nmax_answer_bytes = 4096\n")

    assert load_settings({"GATEWAY_CONFIG": path}).max_answer_bytes == 4096
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    app = create_app({"GATEWAY_CONFIG": path, "GATEWAY_DATABASE_URL": database})
    assert app.extensions["gateway"].client.max_answer_bytes == 4096


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[upstream]\nconect_timeout = 3\n",
            "upstream: unknown key 'conect_timeout'; expected one of: connect_timeout",
        ),
        ("[uptream]\n", "unknown key 'uptream'; expected one of: upstream, server, tasks"),
        ("[upstream]\nread_timeout = 'slow'\n", "upstream.read_timeout: Not a valid number."),
        ("[upstream]\nread_timeout = 0\n", "upstream.read_timeout: Must be greater than 0"),
        ("[server]\nbody_timeout = 0\n", "server.body_timeout: Must be greater than 0"),
        (
            "[upstream]\nmax_answer_bytes = 100\n",
            "upstream.max_answer_bytes: Must be greater than or equal to 1024.",
        ),
        ("[upstream]\nmax_answer_bytes = 1.5\n", "upstream.max_answer_bytes: Not a valid integer."),
        (
            '[[channels]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"\nmodels = ["m"]\n'
            "colour = 1\n",
            "channels[0]: unknown key 'colour'; expected one of: name, base_url",
        ),
        (
            '[[channels]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"\n',
            "channels[0].models: Missing data for required field.",
        ),
        (
            '[[channels]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "UNSET_VAR"\n'
            'models = ["m"]\n',
            "channels[0].api_key_env: environment variable UNSET_VAR is not set",
        ),
        (
            '[models."m".price_per_second]\n"4K" = 1\n',
            "models.m.price_per_second.4K: Must be one of: 480P",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_mistakes_name_the_file_the_key_and_what_was_expected(
    write_config: Callable[[str], str], text: str, expected: str
) -> None:
    path = write_config(text)

    with pytest.raises(ConfigError) as error:
        load_settings({"GATEWAY_CONFIG": path, "K": "secret-value"})

    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)
    assert "secret-value" not in str(error.value)


def test_a_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"/nonexistent.toml: cannot be read"):
        create_app({"GATEWAY_CONFIG": "/nonexistent.toml"})


def test_tasks_defaults_without_a_config_file(tmp_path: Path) -> None:
    settings = load_settings({})

    assert settings.record_retry_seconds == 30
    assert settings.reconcile_interval == 30
    assert settings.reconcile_queries_per_second == 5
    assert settings.adoption_window_seconds == 300
    assert settings.retention_hours == 24
    assert settings.journal_path is None
    # No journal_path: the journal is a file of the instance folder.
    instance = tmp_path / "instance"
    app = create_app(
        {
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "GATEWAY_INSTANCE_PATH": str(instance),
        }
    )
    assert app.extensions["gateway"].journal.path == str(instance / "journal.jsonl")


def test_journal_path_moves_the_journal(write_config: Callable[[str], str], tmp_path: Path) -> None:
    journal = tmp_path / "elsewhere" / "paid.jsonl"
    path = write_config(f'[tasks]\njournal_path = "{journal}"\n')
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"

    app = create_app({"GATEWAY_CONFIG": path, "GATEWAY_DATABASE_URL": database})

    assert app.extensions["gateway"].journal.path == str(journal)
