"""bailian-gateway: DashScope's native async video API, for many clients, over many channels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from cachetools import LRUCache, TTLCache
from flask import Flask, Request, Response
from flask.sessions import NullSession, SessionInterface, SessionMixin

from app.caches import SharedCache
from app.channels import ChannelPool
from app.config import load_settings
from app.gateway import Gateway
from app.journal import Journal
from app.store import open_engine
from app.store.time import clock_from
from app.turns import Turns
from app.upstream import DashScopeClient

# Enough for every active key of a large deployment; a TTL of 0 turns the cache off.
KEY_CACHE_SIZE = 50_000
# Running tasks whose last refresh failed, per worker: an outage's worth of them.
STALE_TASK_CACHE_SIZE = 10_000


def create_app(overrides: Mapping[str, Any] | None = None, *, upgrade_schema: bool = True) -> Flask:
    """Build the gateway application; `overrides` replaces environment variables (tests).

    The database is migrated to this release's schema first, unless `upgrade_schema` is False
    (the CLI, whose `db` commands report the revision before they change it).
    """
    environ = {**os.environ, **(overrides or {})}
    # The instance folder holds the default SQLite database and the journal.
    instance_path = environ.get("GATEWAY_INSTANCE_PATH") or None
    # No static folder: the gateway serves no files, and its route would answer OPTIONS itself.
    app = Flask(
        __name__, instance_path=instance_path, instance_relative_config=True, static_folder=None
    )
    app.session_interface = NoCookieSessions()
    # OPTIONS is no method of DashScope's API: it answers 405 with `Allow` from the errors
    # blueprint, as any other method a route does not take, not Flask's empty text/html 200.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # DashScope answers the same with and without a trailing slash, and its clients send both:
    # AioVideoSynthesis queries `tasks/<id>/`, DashScope's curl samples end submits in one.
    # A redirect instead would turn a POST into a second request, or lose it.
    # Set before any route is added: each rule takes the map's setting when it is added.
    app.url_map.strict_slashes = False
    register_gateway(app, environ, upgrade_schema=upgrade_schema)
    register_observability(app)
    register_blueprints(app)
    register_reconciler(app)
    register_cli(app)
    return app


class NoCookieSessions(SessionInterface):
    """Give every request the same read-only empty session: callers send keys, not cookies."""

    # Flask otherwise builds a fresh NullSession for each request (2% of a cached query's CPU).
    # A NullSession refuses every write, so one can be shared by all requests and threads.
    empty = NullSession()

    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        """Return the shared empty session."""
        return self.empty

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Set no cookie."""


def register_gateway(
    app: Flask, environ: Mapping[str, str], *, upgrade_schema: bool = True
) -> None:
    """Load the settings and open the database, the upstream client and the channel pool."""
    settings = load_settings(environ)
    database_url = settings.database_url
    if database_url is None:
        os.makedirs(app.instance_path, exist_ok=True)
        database_url = f"sqlite:///{os.path.join(app.instance_path, 'gateway.sqlite3')}"
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["gateway"] = Gateway(
        settings=settings,
        engine=open_engine(
            database_url, settings.pool_size, settings.max_overflow, upgrade=upgrade_schema
        ),
        client=DashScopeClient(
            settings.connect_timeout,
            settings.read_timeout,
            settings.query_retries,
            max_answer_bytes=settings.max_answer_bytes,
        ),
        pool=ChannelPool(settings.channels),
        callers=SharedCache(TTLCache(KEY_CACHE_SIZE, settings.key_cache_seconds)),
        final_tasks=SharedCache(LRUCache(settings.final_task_cache_size)),
        stale_tasks=SharedCache(
            TTLCache(
                STALE_TASK_CACHE_SIZE if settings.refresh_interval else 0, settings.refresh_interval
            )
        ),
        turns=Turns(settings.requests_at_once),
        journal=Journal(settings.journal_path or os.path.join(app.instance_path, "journal.jsonl")),
        clock=clock_from(environ),
    )


def register_observability(app: Flask) -> None:
    """Give requests ids; log JSON lines, one per request and upstream call; count both."""
    from app.observability.access import observe_requests
    from app.observability.logs import configure_logging
    from app.routes import metrics

    configure_logging()
    observe_requests(app)
    app.register_blueprint(metrics.bp)


def register_blueprints(app: Flask) -> None:
    """Mount the compatibility routes, their OpenAPI document, health and errors."""
    from app import errors
    from app.routes import compat, docs, health

    app.register_blueprint(errors.bp)
    app.register_blueprint(compat.bp, url_prefix="/alibailian/api/v1")
    app.register_blueprint(docs.bp, url_prefix="/alibailian/api/v1")
    app.register_blueprint(health.bp)


def register_reconciler(app: Flask) -> None:
    """Make the reconciler the service runs in the background (wsgi.py) and the CLI once."""
    from app.reconcile import Reconciler

    app.extensions["reconciler"] = Reconciler(app.extensions["gateway"])


def register_cli(app: Flask) -> None:
    """Add the `keys`, `db`, `accounts`, `usage` and `reconcile` commands to the CLI."""
    from app.cli import accounts_cli, db_cli, keys_cli, reconcile_command, usage_command

    app.cli.add_command(keys_cli)
    app.cli.add_command(db_cli)
    app.cli.add_command(accounts_cli)
    app.cli.add_command(usage_command)
    app.cli.add_command(reconcile_command)
