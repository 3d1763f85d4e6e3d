"""Shared fixtures: a real app over a real database, and DashScope faked on the wire."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, MetaData, create_engine

from app import create_app
from app.store import create_key

PRIMARY = "https://dashscope.test"
INTL = "https://dashscope-intl.test"
PRIMARY_UPSTREAM_KEY = "sk-upstream-primary-0123456789"
INTL_UPSTREAM_KEY = "sk-upstream-intl-9876543210"
SUBMIT_PATH = "/alibailian/api/v1/services/aigc/video-generation/video-synthesis"
KF2V_PATH = "/alibailian/api/v1/services/aigc/image2video/video-synthesis"

BASE_CONFIG = f"""
[upstream]
connect_timeout = 2
read_timeout = 5
query_retries = 0

[tasks]
refresh_interval = 0

[[channels]]
name = "primary"
base_url = "{PRIMARY}"
api_key_env = "PRIMARY_UPSTREAM_KEY"
models = ["wan2.5-t2v-preview", "wanx2.1-kf2v-plus", "wan-unpriced"]

[[channels]]
name = "intl"
base_url = "{INTL}"
api_key_env = "INTL_UPSTREAM_KEY"
models = ["wan2.2-t2v-plus"]

[models."wan2.5-t2v-preview".price_per_second]
"480P" = 0.3
"720P" = 0.6

[models."wanx2.1-kf2v-plus".price_per_second]
"720P" = 0.7

[models."wan2.2-t2v-plus".price_per_second]
"1080P" = 1.0

[models."wan-unserved".price_per_second]
"480P" = 0.1
"""


def _database_params() -> list:
    params = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get("GATEWAY_TEST_DATABASE_URL"):
        params.append(pytest.param("postgresql", id="postgresql"))
    return params


@pytest.fixture(params=_database_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Return an empty database: SQLite in tmp_path, or the test PostgreSQL, wiped first."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
        return
    url = os.environ["GATEWAY_TEST_DATABASE_URL"]
    engine = create_engine(url)
    wipe(engine)
    engine.dispose()
    yield url


def wipe(engine: Engine) -> None:
    """Drop every table of the database: today's, an older schema's, and alembic_version."""
    # Reflected rather than taken from app.store.tables: a stale alembic_version row, or a table
    # of another revision, would make the next test start from a schema it did not ask for.
    found = MetaData()
    found.reflect(engine)
    found.drop_all(engine)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], str]:
    """Return a function that writes TOML text to a file and returns its path."""

    def write(text: str) -> str:
        path = tmp_path / "gateway.toml"
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def app_over(database_url: str, config_path: str, tmp_path: Path, **environ: str) -> Flask:
    """Return a real app over a database, with a config file and the channels' keys set."""
    app = create_app(
        {
            "GATEWAY_CONFIG": config_path,
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_INSTANCE_PATH": str(tmp_path / "instance"),
            "PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY,
            "INTL_UPSTREAM_KEY": INTL_UPSTREAM_KEY,
            **environ,
        }
    )
    app.config["TESTING"] = True
    return app


@pytest.fixture
def make_app(
    database_url: str, write_config: Callable[[str], str], tmp_path: Path
) -> Callable[..., Flask]:
    """Return a factory of real apps over the test database with a given config text."""

    def make(config_text: str = BASE_CONFIG, **environ: str) -> Flask:
        return app_over(database_url, write_config(config_text), tmp_path, **environ)

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Iterator[Flask]:
    """Return the gateway app on the base config."""
    app = make_app()
    yield app
    app.extensions["gateway"].engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Return a test client of the app."""
    return app.test_client()


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    """Fake DashScope on the wire; every registered answer must be used, nothing else is."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock
    # The gateway turns a refused connection into a native answer, so an unexpected call
    # would pass unnoticed unless it fails the test here.
    unexpected = [
        call.request.url
        for call in mock.calls
        if "doesn't match any registered mock" in str(call.response)
    ]
    assert not unexpected, f"unexpected upstream calls: {unexpected}"


def new_key(app: Flask, account: str = "acme", models: list[str] | None = None) -> str:
    """Create a gateway key through the store and return its secret."""
    return create_key(app.extensions["gateway"].engine, account, models)


@pytest.fixture
def api_key(app: Flask) -> str:
    """Return a fresh key of account `acme` with no allowlist."""
    return new_key(app)


def bearer(key: str) -> dict[str, str]:
    """Return the Authorization header DashScope clients send."""
    return {"Authorization": f"Bearer {key}"}
