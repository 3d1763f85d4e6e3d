"""The operator CLI: keys create, list and revoke; config check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import ConfigError, load_settings
from tests.conftest import BASE_CONFIG, INTL_UPSTREAM_KEY, PRIMARY_UPSTREAM_KEY, bearer

CHANNEL_KEYS = {
    "PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY,
    "INTL_UPSTREAM_KEY": INTL_UPSTREAM_KEY,
}


def test_keys_create_prints_a_working_key_on_the_last_line(app: Flask, client: FlaskClient) -> None:
    result = app.test_cli_runner().invoke(args=["keys", "create", "acme"])

    key = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0
    assert key.startswith("sk-")
    assert client.get("/alibailian/api/v1/tasks/x", headers=bearer(key)).json["code"] == (
        "task_not_exist"
    )


def test_keys_list_never_shows_secrets(app: Flask) -> None:
    runner = app.test_cli_runner()
    key = runner.invoke(args=["keys", "create", "acme", "--models", "b,a"]).output.split()[-1]

    listing = runner.invoke(args=["keys", "list"]).output

    assert key not in listing
    assert key[-4:] in listing
    assert "acme" in listing
    assert "a,b" in listing


def test_keys_revoke_by_secret_and_by_id(app: Flask, client: FlaskClient) -> None:
    runner = app.test_cli_runner()
    first = runner.invoke(args=["keys", "create", "acme"]).output.split()[-1]
    second = runner.invoke(args=["keys", "create", "acme"]).output.split()[-1]

    by_secret = runner.invoke(args=["keys", "revoke", first])
    by_id = runner.invoke(args=["keys", "revoke", "2"])
    again = runner.invoke(args=["keys", "revoke", first])

    assert (by_secret.exit_code, by_id.exit_code, again.exit_code) == (0, 0, 1)
    for key in (first, second):
        response = client.get("/alibailian/api/v1/tasks/x", headers=bearer(key))
        assert response.json["message"] == "Invalid API-key provided."
    assert runner.invoke(args=["keys", "list"]).output.count("revoked") == 2


# --------------------------------------------------------------------------- config check


def config_check(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run the real `bailian-gateway config check ARGS` with only these variables set."""
    # A database nobody listens on: the check must not try to open it.
    env = {
        "PATH": os.environ["PATH"],
        "GATEWAY_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
        **environ,
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "bailian-gateway"), "config", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_check_prints_the_channels_and_the_offered_models(
    write_config: Callable[[str], str],
) -> None:
    path = write_config(BASE_CONFIG)

    done = config_check(GATEWAY_CONFIG=path, **CHANNEL_KEYS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {path}\nchannels: 2\n")
    assert "models offered: 3: wan2.2-t2v-plus, wan2.5-t2v-preview, wanx2.1-kf2v-plus" in (
        done.stdout
    )
    assert PRIMARY_UPSTREAM_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        pytest.param("[upstream\nread_timeout = 3\n", CHANNEL_KEYS, id="toml-typo"),
        pytest.param(BASE_CONFIG, {"PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY}, id="key-unset"),
        pytest.param("[server]\nmax_body_bytes = '1'\n", {}, id="wrong-type"),
    ],
)
def test_config_check_fails_with_the_services_own_message(
    write_config: Callable[[str], str], text: str, environ: dict[str, str]
) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as refused:  # what the service stops with at start-up
        load_settings({"GATEWAY_CONFIG": path, **environ})

    done = config_check(GATEWAY_CONFIG=path, **environ)

    assert done.returncode == 1
    assert done.stderr.strip() == str(refused.value)
    assert done.stderr.startswith(f"{path}: ")
    assert done.stdout == ""


def test_config_check_file_option_wins_over_the_environment(
    write_config: Callable[[str], str], tmp_path: Path
) -> None:
    good = write_config(BASE_CONFIG)

    done = config_check("--file", good, GATEWAY_CONFIG=str(tmp_path / "gone.toml"), **CHANNEL_KEYS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {good}\n")
