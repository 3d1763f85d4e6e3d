"""End-to-end fixtures: the real simulator, the real CLI and the real gunicorn, as processes.

Nothing of the project is imported or mocked here: the DashScope simulator runs as
`python -m simulator`, keys are made with the `bailian-gateway` console script, and the
gateway is served by gunicorn with the shipped `gunicorn.conf.py`. One simulator serves the
whole session; one gateway runs per database backend (SQLite, and PostgreSQL when
GATEWAY_TEST_DATABASE_URL is set), and every test runs against each.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, make_url, text

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
API_PREFIX = "/alibailian/api/v1"
SUBMIT_PATH = f"{API_PREFIX}/services/aigc/video-generation/video-synthesis"
KF2V_SUBMIT_PATH = f"{API_PREFIX}/services/aigc/image2video/video-synthesis"
UPSTREAM_SUBMIT_PATH = "/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_KF2V_SUBMIT_PATH = "/api/v1/services/aigc/image2video/video-synthesis"
HTTP_TIMEOUT = 30  # seconds, for every raw HTTP call a test makes

# Simulator timings: a task is PENDING for 0.3 s, RUNNING for 0.7 s, then final.
PENDING_SECONDS = 0.3
RUNNING_SECONDS = 0.7
# The gateway's upstream read timeout, and a `[sleep=N]` prompt that exceeds it.
READ_TIMEOUT = 2.0
SLOW_PROMPT = "[sleep=4] a slow upstream"
# How long a worker may keep honouring a revoked key ([server] key_cache_seconds).
KEY_CACHE_SECONDS = 0.5

# Models, each served in a way tests can aim at.
T2V = "wan2.5-t2v-preview"  # channel `sim`
I2V = "wan2.5-i2v-preview"  # channel `sim`
KF2V = "wanx2.1-kf2v-plus"  # channel `sim`; the SDK sends it to the image2video route
S2V = "wan2.2-s2v"  # channel `sim`: an image2video task, after its check S2V_DETECT
S2V_DETECT = "wan2.2-s2v-detect"  # channel `sim`, no price: the synchronous face-detect
UNREACHABLE_MODEL = "wan-e2e-unreachable"  # channel `dead`: a closed local port
REFUSED_MODEL = "wan-e2e-key-refused"  # channel `refused`: a key the simulator rejects
FAILOVER_MODEL = "wan-e2e-failover"  # `dead-first` (priority 10), then `sim-failover`
SLOW_MODEL = "wan-e2e-slow"  # channel `sim-slow`: cools down alone after a timeout
THROTTLED_MODEL = "wan-e2e-throttled"  # channel `sim-throttled`: cools down alone after a 429
BROKEN_MODEL = "wan-e2e-broken"  # channel `sim-broken`: cools down alone after a 500
PRICED_UNSERVED_MODEL = "wan-e2e-priced-unserved"  # a price, no channel
SERVED_UNPRICED_MODEL = "wan-e2e-served-unpriced"  # a channel, no price
UNKNOWN_MODEL = "wan-e2e-no-such-model"  # neither

# Channel secrets, random per session so that finding one in a log is unambiguous.
SIM_KEY = f"sk-e2e-sim-{secrets.token_hex(12)}"
SIM_SPARE_KEY = f"sk-e2e-spare-{secrets.token_hex(12)}"
REFUSED_KEY = f"sk-e2e-refused-{secrets.token_hex(12)}"
DEAD_KEY = f"sk-e2e-dead-{secrets.token_hex(12)}"
CHANNEL_ENV = {
    "E2E_SIM_KEY": SIM_KEY,
    "E2E_SIM_SPARE_KEY": SIM_SPARE_KEY,
    "E2E_REFUSED_KEY": REFUSED_KEY,
    "E2E_DEAD_KEY": DEAD_KEY,
}
CHANNEL_KEYS = tuple(CHANNEL_ENV.values())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the log audit (test_secrets.py) after every other e2e test of the same gateway.

    It runs after pytest grouped the tests by database backend (one gateway each), touches
    only this directory's tests, and keeps every other order as pytest made it.
    """
    here = Path(__file__).parent
    slots = [index for index, item in enumerate(items) if here in item.path.parents]

    def rank(item: pytest.Item) -> tuple[int, bool]:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec else None
        group = BACKENDS.index(backend) if backend in BACKENDS else -1
        return group, item.path.name == "test_secrets.py"

    ordered = sorted((items[index] for index in slots), key=rank)
    for index, item in zip(slots, ordered, strict=True):
        items[index] = item


# --------------------------------------------------------------------------- processes


def _reserve_closed_port() -> socket.socket:
    """Return a socket bound to a local port that never listens: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_environ() -> dict[str, str]:
    """The test process's environment without anything that could steer the gateway or SDK."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GATEWAY_", "DASHSCOPE_", "SIMULATOR_", "FLASK_", "PROMETHEUS"))
        and name != "XDG_RUNTIME_DIR"
    }


def stop(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM a process we started, wait for it, and kill it if it will not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


@dataclass
class Simulator:
    """The DashScope simulator process and its test-only endpoints."""

    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        """Return the simulator's counters and the last submit it received."""
        response = requests.get(f"{self.url}/_sim/stats", timeout=HTTP_TIMEOUT)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def last_submit(self) -> dict[str, Any]:
        """Return the last submit that reached upstream: headers (lower-case), body, path."""
        last = self.stats()["last_submit"]
        assert last is not None, "nothing reached the simulator"
        return dict(last)


def start_simulator(
    log_dir: Path,
    pending_seconds: float = PENDING_SECONDS,
    running_seconds: float = RUNNING_SECONDS,
) -> Simulator:
    """Start `python -m simulator` on a free port with the e2e channel keys; wait until bound."""
    log_path = log_dir / "simulator.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulator",
                "--port",
                "0",
                "--keys",
                f"{SIM_KEY},{SIM_SPARE_KEY}",
                "--pending-seconds",
                str(pending_seconds),
                "--running-seconds",
                str(running_seconds),
            ],
            cwd=REPO_ROOT,
            env=_clean_environ(),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=20)
    except queue.Empty:
        stop(process)
        pytest.fail(f"the simulator did not start:\n{log_path.read_text()}")
    prefix = "simulator listening on "
    if not line.startswith(prefix):
        stop(process)
        pytest.fail(f"unexpected simulator output {line!r}:\n{log_path.read_text()}")
    return Simulator(url=line[len(prefix) :].strip(), process=process)


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """Serve the e2e session's DashScope: short timings, fixed keys."""
    sim = start_simulator(tmp_path_factory.mktemp("simulator"))
    try:
        yield sim
    finally:
        stop(sim.process)
        if sim.process.stdout is not None:
            sim.process.stdout.close()


# --------------------------------------------------------------------------- the gateway


def _database_params() -> list[Any]:
    params = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get("GATEWAY_TEST_DATABASE_URL"):
        params.append(pytest.param("postgresql", id="postgresql"))
    return params


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session", params=_database_params())
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Return an empty database, as tests/conftest.py's fixture does, for a whole session.

    It overrides the shared function-scoped fixture with the same parameters (sqlite, and
    postgresql when GATEWAY_TEST_DATABASE_URL is set) because a running gateway outlives one
    test. PostgreSQL gets a schema of its own, dropped afterwards, so unit tests that wipe the
    shared test database at the same time cannot pull the tables from under the gateway.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('e2e-sqlite') / 'gateway.sqlite3'}"
        return
    base = make_url(os.environ["GATEWAY_TEST_DATABASE_URL"])
    schema = f"e2e_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _config_text(simulator_url: str, closed_port: int) -> str:
    dead = f"http://127.0.0.1:{closed_port}"
    return textwrap.dedent(
        f"""
        [upstream]
        connect_timeout = 2
        read_timeout = {READ_TIMEOUT}
        query_retries = 1

        [server]
        key_cache_seconds = {KEY_CACHE_SECONDS}

        [tasks]
        refresh_interval = 0
        # Tests count the calls that reach the simulator: no background passes here.
        reconcile_interval = 0

        [[channels]]
        name = "sim"
        base_url = "{simulator_url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{T2V}", "{I2V}", "{KF2V}", "{S2V}", "{S2V_DETECT}", "{SERVED_UNPRICED_MODEL}"]

        [[channels]]
        name = "dead"
        base_url = "{dead}"
        api_key_env = "E2E_DEAD_KEY"
        models = ["{UNREACHABLE_MODEL}"]

        [[channels]]
        name = "refused"
        base_url = "{simulator_url}"
        api_key_env = "E2E_REFUSED_KEY"
        models = ["{REFUSED_MODEL}"]

        [[channels]]
        name = "dead-first"
        base_url = "{dead}"
        api_key_env = "E2E_DEAD_KEY"
        models = ["{FAILOVER_MODEL}"]
        priority = 10

        [[channels]]
        name = "sim-failover"
        base_url = "{simulator_url}"
        api_key_env = "E2E_SIM_SPARE_KEY"
        models = ["{FAILOVER_MODEL}"]

        [[channels]]
        name = "sim-slow"
        base_url = "{simulator_url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{SLOW_MODEL}"]

        [[channels]]
        name = "sim-throttled"
        base_url = "{simulator_url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{THROTTLED_MODEL}"]

        [[channels]]
        name = "sim-broken"
        base_url = "{simulator_url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{BROKEN_MODEL}"]
        """
    ) + "".join(
        f'\n[models."{model}".price_per_second]\n"480P" = 0.3\n"720P" = 0.6\n'
        for model in (
            T2V,
            I2V,
            KF2V,
            S2V,
            UNREACHABLE_MODEL,
            REFUSED_MODEL,
            FAILOVER_MODEL,
            SLOW_MODEL,
            THROTTLED_MODEL,
            BROKEN_MODEL,
            PRICED_UNSERVED_MODEL,
        )
    )


@dataclass
class Gateway:
    """A running gunicorn serving the gateway, and the CLI against the same configuration."""

    backend: str
    url: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    issued_keys: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        """Return the DashScope-compatible base URL (what clients set as their base)."""
        return f"{self.url}{API_PREFIX}"

    def cli(self, *args: str) -> str:
        """Run `bailian-gateway ARGS...` and return its stdout."""
        done = subprocess.run(
            [str(BIN_DIR / "bailian-gateway"), *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"bailian-gateway {args[:2]} failed:\n{done.stderr}"
        return done.stdout

    def create_key(self, account: str, models: list[str] | None = None) -> str:
        """Create a key for the account with the CLI; the secret is stdout's last line."""
        args = ["keys", "create", account]
        if models is not None:
            args += ["--models", ",".join(models)]
        secret = self.cli(*args).strip().splitlines()[-1].strip()
        assert secret.startswith("sk-"), secret
        self.issued_keys.append(secret)
        return secret

    def revoke_key(self, secret: str) -> None:
        """Revoke a key with the CLI, and wait out the workers' key caches."""
        self.cli("keys", "revoke", secret)
        time.sleep(KEY_CACHE_SECONDS)

    def query(self, sql: str) -> list[Any]:
        """Return the rows a read of the gateway's own database gives, as a test looks."""
        engine = create_engine(make_url(self.env["GATEWAY_DATABASE_URL"]))
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql)).all())
        finally:
            engine.dispose()

    def log_text(self) -> str:
        """Return everything gunicorn and the app wrote so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the gunicorn master."""
        self.process.send_signal(signum)

    def log_lines(self) -> list[dict[str, Any]]:
        """Return the log, every line parsed as the JSON object it must be."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def messages(self, logger: str = "gunicorn.error") -> list[str]:
        """Return the messages one logger wrote so far."""
        return [line["message"] for line in self.log_lines() if line.get("logger") == logger]

    def wait_for_log(self, predicate: Callable[[list[str]], bool], timeout: float = 30) -> None:
        """Wait until gunicorn's own messages satisfy the predicate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.messages()):
                return
            time.sleep(0.1)
        pytest.fail(f"gunicorn never logged what was expected:\n{self.log_text()}")

    def secrets_in_log(self) -> list[str]:
        """Return the channel and gateway keys that appear in the log, masked."""
        log = self.log_text()
        found = []
        for secret in (*CHANNEL_KEYS, *self.issued_keys):
            # The secret part alone too, in case something strips the `sk-` prefix.
            if secret in log or secret.removeprefix("sk-") in log:
                found.append(secret[:10] + "...")
        return found


def _wait_until_serving(gateway: Gateway, deadline: float) -> None:
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(f"gunicorn exited with {gateway.process.returncode}:\n{gateway.log_text()}")
        try:
            if requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet, or too busy to answer: keep waiting until the deadline
        time.sleep(0.1)
    pytest.fail(f"gunicorn did not answer /healthz in time:\n{gateway.log_text()}")


def start_gateway(
    workdir: Path,
    database_url: str,
    config_text: str,
    extra_env: dict[str, str] | None = None,
    *,
    access_log: str | None = "-",
    own_runtime_dir: bool = True,
    settings_file: str = "gunicorn.conf.py",
) -> Gateway:
    """Serve the gateway with gunicorn (2 workers x 8 threads) and wait until it answers.

    `extra_env` goes to gunicorn only (not to the CLI) and wins over every default below.
    `access_log` is GATEWAY_ACCESS_LOG: by default "-" (to stdout, the same file as the rest,
    so the secrets audit covers it); None leaves it unset (gunicorn.conf.py's default, none).
    `own_runtime_dir` points XDG_RUNTIME_DIR at the workdir; False leaves it unset, so
    gunicorn falls back to its defaults as on a machine without one. `settings_file` is
    gunicorn's `-c` (the shipped gunicorn.conf.py unless a test gives a copy of its own).
    """
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "gateway.toml"
    config_path.write_text(config_text)
    env = {
        **_clean_environ(),
        **CHANNEL_ENV,
        "GATEWAY_CONFIG": str(config_path),
        "GATEWAY_DATABASE_URL": database_url,
        # The journal (and a default SQLite file) of this gateway, shared with its CLI only.
        "GATEWAY_INSTANCE_PATH": str(workdir / "instance"),
        "PYTHONUNBUFFERED": "1",
    }
    server_env = {
        **env,
        "GATEWAY_WORKERS": "2",
        "GATEWAY_THREADS": "8",
        "GATEWAY_GRACEFUL_TIMEOUT": "5",
    }
    if own_runtime_dir:
        # gunicorn's control socket goes here, not in a home directory shared with every other
        # gunicorn on the machine.
        server_env["XDG_RUNTIME_DIR"] = str(workdir)
    if access_log is not None:
        server_env["GATEWAY_ACCESS_LOG"] = access_log
    server_env.update(extra_env or {})
    port = _free_port()
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(BIN_DIR / "gunicorn"),
                "-c",
                settings_file,
                "-b",
                f"127.0.0.1:{port}",
                "wsgi:app",
            ],
            cwd=REPO_ROOT,
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gw = Gateway(
        backend=backend,
        url=f"http://127.0.0.1:{port}",
        env=env,
        log_path=log_path,
        process=process,
    )
    try:
        _wait_until_serving(gw, time.monotonic() + 30)
    except BaseException:
        stop(process)
        raise
    return gw


@pytest.fixture(scope="session")
def gateway(
    database_url: str, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Serve the e2e gateway over one database backend, and audit its log for secrets."""
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    closed = _reserve_closed_port()
    config = _config_text(simulator.url, closed.getsockname()[1])
    gw = start_gateway(tmp_path_factory.mktemp(f"gateway-{backend}"), database_url, config)
    try:
        yield gw
    finally:
        stop(gw.process)
        closed.close()
    leaked = gw.secrets_in_log()
    assert not leaked, f"secrets in the gunicorn log {gw.log_path}: {leaked}"


@pytest.fixture(autouse=True)
def _gateway_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test on the session's gateway with gunicorn's exit code and log if it died.

    Without this, every later test fails on "connection refused" and the reason is lost
    with the temporary directory.
    """
    if "gateway" not in request.fixturenames:
        yield
        return
    gw: Gateway = request.getfixturevalue("gateway")
    _fail_if_exited(gw)
    yield
    _fail_if_exited(gw)


def _fail_if_exited(gateway: Gateway) -> None:
    if gateway.process.poll() is not None:
        tail = "\n".join(gateway.log_text().splitlines()[-60:])
        pytest.fail(
            f"the {gateway.backend} gateway's gunicorn exited with "
            f"{gateway.process.returncode}; the end of its log:\n{tail}"
        )


@dataclass(frozen=True)
class Keys:
    """Gateway keys made with the CLI for the e2e accounts."""

    alice: str  # account e2e-alice
    alice_second: str  # a second key of e2e-alice
    bob: str  # account e2e-bob
    limited: str  # account e2e-carol, allowlist: T2V only


@pytest.fixture(scope="session")
def keys(gateway: Gateway) -> Keys:
    """Create the e2e accounts' keys once per gateway."""
    return Keys(
        alice=gateway.create_key("e2e-alice"),
        alice_second=gateway.create_key("e2e-alice"),
        bob=gateway.create_key("e2e-bob"),
        limited=gateway.create_key("e2e-carol", models=[T2V]),
    )


# --------------------------------------------------------------------------- helpers


def bearer(key: str) -> dict[str, str]:
    """Return the Authorization header DashScope clients send."""
    return {"Authorization": f"Bearer {key}"}


def assert_native_error(
    response: requests.Response, status: int, code: str, message: str | None = None
) -> dict[str, Any]:
    """Check a DashScope envelope error: status, JSON type, request_id/code/message, header."""
    assert response.status_code == status, response.text[:500]
    assert response.headers.get("Content-Type", "").startswith("application/json")
    assert "<html" not in response.text.lower()
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("request_id"), str)
    assert body["request_id"]
    assert body.get("code") == code, body
    assert isinstance(body.get("message"), str)
    assert body["message"]
    if message is not None:
        assert body["message"] == message, body
    # The header carries the same id (upstream's, when the answer is upstream's).
    assert response.headers.get("X-Request-Id") == body["request_id"], dict(response.headers)
    return dict(body)


def submit(
    gateway: Gateway,
    key: str,
    model: str = T2V,
    prompt: str = "a cat on a skateboard",
    *,
    session: Any = requests,
    **parameters: Any,
) -> requests.Response:
    """Submit a text-to-video task over raw HTTP (on `session`, a requests.Session, if given)."""
    body = {"model": model, "input": {"prompt": prompt}, "parameters": parameters}
    return session.post(
        f"{gateway.url}{SUBMIT_PATH}", json=body, headers=bearer(key), timeout=HTTP_TIMEOUT
    )


def query(
    gateway: Gateway, key: str, task_id: str, *, session: Any = requests
) -> requests.Response:
    """Query a task over raw HTTP (on `session`, a requests.Session, if given)."""
    return session.get(f"{gateway.api}/tasks/{task_id}", headers=bearer(key), timeout=HTTP_TIMEOUT)
