"""Operating the gateway under gunicorn: reloads and stops, metrics over workers, JSON logs.

These tests signal their gunicorn master (HUP, TERM), so each one starts its own with the
shipped gunicorn.conf.py, next to the session's simulator and database (conftest.py).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import bindparam, create_engine, text

from .conftest import (
    BIN_DIR,
    HTTP_TIMEOUT,
    REPO_ROOT,
    SIM_KEY,
    SUBMIT_PATH,
    T2V,
    Simulator,
    bearer,
)

SLOW_SECONDS = 2.0
SLOW_PROMPT = f"[sleep={SLOW_SECONDS}] in flight"
# A base64 image as clients send them: its text must never reach a log.
IMAGE_MARKER = base64.b64encode(b"\x89PNG-e2e-never-log-this-" * 8).decode()


def free_port() -> int:
    """Return a local port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """Return the test's environment without anything that steers gunicorn or the gateway."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GATEWAY_", "DASHSCOPE_", "SIMULATOR_", "FLASK_", "PROMETHEUS"))
        and name != "XDG_RUNTIME_DIR"
    }


@dataclass
class Server:
    """One gunicorn master serving the gateway, and the CLI over the same configuration."""

    url: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the master."""
        self.process.send_signal(signum)

    def log_lines(self) -> list[dict[str, Any]]:
        """Return the log, every line parsed as the JSON object it must be."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

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
        pytest.fail(f"gunicorn never logged what was expected:\n{self.log_path.read_text()}")

    def create_key(self, account: str) -> str:
        """Create a gateway key with the CLI; the secret is stdout's last line."""
        done = subprocess.run(
            [str(BIN_DIR / "bailian-gateway"), "keys", "create", account],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    def submit(self, key: str, prompt: str = "a cat", session: Any = requests) -> requests.Response:
        """Submit a text-to-video task."""
        body = {"model": T2V, "input": {"prompt": prompt}}
        return session.post(
            f"{self.url}{SUBMIT_PATH}", json=body, headers=bearer(key), timeout=HTTP_TIMEOUT
        )

    def query(self, key: str, task_id: str, session: Any = requests) -> requests.Response:
        """Query a task."""
        return session.get(
            f"{self.url}/alibailian/api/v1/tasks/{task_id}",
            headers=bearer(key),
            timeout=HTTP_TIMEOUT,
        )


def booted(messages: list[str]) -> list[str]:
    """Return the pids of the workers gunicorn booted, in order."""
    prefix = "Booting worker with pid: "
    return [m.removeprefix(prefix) for m in messages if m.startswith(prefix)]


def exited(messages: list[str]) -> list[str]:
    """Return the pids of the workers that exited."""
    return [m.removeprefix("Worker exiting (pid: ").rstrip(")") for m in messages if "exiting" in m]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a gunicorn we started, and kill it if it will not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def serve(
    database_url: str, simulator: Simulator, tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """Return a function that starts a gunicorn (2 workers x 8 threads) with extra env."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [upstream]
            connect_timeout = 2
            read_timeout = 10

            [tasks]
            refresh_interval = 0

            [[channels]]
            name = "sim"
            base_url = "{simulator.url}"
            api_key_env = "E2E_SIM_KEY"
            models = ["{T2V}"]

            [models."{T2V}".price_per_second]
            "480P" = 0.3
            """
        )
    )
    env = {
        **clean_environ(),
        "E2E_SIM_KEY": SIM_KEY,
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> Server:
        port = free_port()
        log_path = tmp_path / f"gunicorn-{len(started)}.log"
        server_env = {
            **env,
            "GATEWAY_WORKERS": "2",
            "GATEWAY_THREADS": "8",
            "GATEWAY_GRACEFUL_TIMEOUT": "30",
            **extra,
        }
        command = [str(BIN_DIR / "gunicorn"), "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}"]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, "wsgi:app"],
                cwd=REPO_ROOT,
                env=server_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        server = Server(f"http://127.0.0.1:{port}", env, log_path, process)
        wait_until_serving(server)
        return server

    yield start
    for process in started:
        stop(process)


def wait_until_serving(server: Server) -> None:
    """Wait until /healthz answers, failing with the log if gunicorn dies first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited:\n{server.log_path.read_text()}")
        try:
            if requests.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass  # listening (the master's socket) before a worker has loaded the app
        time.sleep(0.1)
    pytest.fail(f"gunicorn did not serve in time:\n{server.log_path.read_text()}")


class InFlight:
    """Slow submits running in threads, started and then waited for."""

    def __init__(self, server: Server, key: str, count: int) -> None:
        self.answers: list[requests.Response | Exception] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._submit, args=(server, key)) for _ in range(count)
        ]

    def _submit(self, server: Server, key: str) -> None:
        try:
            answer: requests.Response | Exception = server.submit(key, SLOW_PROMPT)
        except requests.RequestException as exc:
            answer = exc
        with self._lock:
            self.answers.append(answer)

    def start(self, simulator: Simulator) -> None:
        """Start the submits and return once every one of them is being served upstream."""
        before = simulator.stats()["submits"]
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + 15
        while simulator.stats()["submits"] < before + len(self._threads):
            assert time.monotonic() < deadline, "the slow submits never reached upstream"
            time.sleep(0.05)

    def task_ids(self) -> list[str]:
        """Wait for every submit; each must have been answered 200; return the task ids."""
        for thread in self._threads:
            thread.join(timeout=60)
        statuses = [a if isinstance(a, Exception) else a.status_code for a in self.answers]
        assert statuses == [200] * len(self._threads)
        return [a.json()["output"]["task_id"] for a in self.answers if not isinstance(a, Exception)]


# --------------------------------------------------------------------------- graceful restarts


def test_hup_lets_in_flight_requests_finish_on_the_old_workers(
    serve: Callable[..., Server], simulator: Simulator
) -> None:
    server = serve()
    key = server.create_key("ops-hup")
    server.wait_for_log(lambda m: len(booted(m)) == 2)
    old_workers = booted(server.messages())
    slow = InFlight(server, key, 4)
    slow.start(simulator)

    server.signal(signal.SIGHUP)
    task_ids = slow.task_ids()

    server.wait_for_log(lambda m: len(booted(m)) == 4 and set(old_workers) <= set(exited(m)))
    assert [server.query(key, task_id).status_code for task_id in task_ids] == [200] * 4
    assert server.process.poll() is None


def test_a_load_running_through_reloads_sees_no_failed_request(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    key = server.create_key("ops-load")
    server.wait_for_log(lambda m: len(booted(m)) == 2)
    outcomes: list[tuple[str, int | str]] = []
    task_ids: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 5.0

    def client() -> None:
        # A kept-alive session, as SDKs use: reloads must not break its connections either.
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                try:
                    submitted = server.submit(key, "[sleep=0.05] load", session)
                    query = submitted.status_code
                    if submitted.status_code == 200:
                        task_id = submitted.json()["output"]["task_id"]
                        with lock:
                            task_ids.append(task_id)
                        query = server.query(key, task_id, session).status_code
                    result: list[tuple[str, int | str]] = [
                        ("submit", submitted.status_code),
                        ("query", query),
                    ]
                except requests.RequestException as exc:
                    result = [("error", repr(exc))]
                with lock:
                    outcomes.extend(result)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    server.signal(signal.SIGHUP)
    time.sleep(1.5)
    server.signal(signal.SIGHUP)
    for thread in threads:
        thread.join(timeout=60)

    failed = [outcome for outcome in outcomes if outcome[1] != 200]
    assert failed == []
    assert len(task_ids) >= 20, "the load was too light to say anything"
    server.wait_for_log(lambda m: len(booted(m)) == 6)
    recorded = [server.query(key, task_id).status_code for task_id in task_ids]
    assert recorded == [200] * len(task_ids)


def test_term_lets_in_flight_requests_finish_before_the_master_exits(
    serve: Callable[..., Server], simulator: Simulator, database_url: str
) -> None:
    server = serve()
    key = server.create_key("ops-term")
    slow = InFlight(server, key, 3)
    slow.start(simulator)

    server.signal(signal.SIGTERM)
    task_ids = slow.task_ids()

    assert server.process.wait(timeout=30) == 0
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            query = text("SELECT task_id FROM tasks WHERE task_id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            )
            stored = {row[0] for row in conn.execute(query, {"ids": task_ids})}
    finally:
        engine.dispose()
    assert stored == set(task_ids)


# --------------------------------------------------------------------------- metrics and logs


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Return every sample of one /metrics answer, on a fresh connection."""
    response = requests.get(f"{server.url}/metrics", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


HEALTHZ_200 = (
    "bailian_gateway_http_requests_total",
    frozenset({("route", "health.healthz"), ("method", "GET"), ("status", "200")}),
)


def test_metrics_add_up_over_all_workers_and_survive_a_reload(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over by an earlier run")
    server = serve(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    assert not (metrics_dir / "counter_1.db").exists()
    before = scrape(server).get(HEALTHZ_200, 0.0)

    def hit(_: int) -> None:
        for _ in range(10):
            assert requests.get(f"{server.url}/healthz", timeout=HTTP_TIMEOUT).status_code == 200

    threads = [threading.Thread(target=hit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Whichever worker answers the scrape, it counts what every worker served.
    assert {scrape(server)[HEALTHZ_200] - before for _ in range(8)} == {60}
    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(booted(m)) == 4 and len(exited(m)) == 2)
    assert scrape(server)[HEALTHZ_200] - before == 60


def test_without_a_metrics_dir_the_master_makes_one_and_removes_it(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    [announced] = [m for m in server.messages() if m.startswith("metrics of the workers")]
    directory = Path(announced.rsplit(" ", 1)[-1])
    assert directory.is_dir()

    server.signal(signal.SIGTERM)

    assert server.process.wait(timeout=30) == 0
    assert not directory.exists()


def test_the_gunicorn_log_is_json_lines_without_keys_or_bodies(
    serve: Callable[..., Server],
) -> None:
    server = serve(GATEWAY_ACCESS_LOG="-")
    key = server.create_key("ops-logs")
    revoked = server.create_key("ops-logs")
    image = f"data:image/png;base64,{IMAGE_MARKER}"
    body = {"model": T2V, "input": {"prompt": "p", "img_url": image}}
    url = f"{server.url}{SUBMIT_PATH}"
    accepted = requests.post(url, json=body, headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert accepted.status_code == 200
    task_id = accepted.json()["output"]["task_id"]
    assert server.query(key, task_id).status_code == 200
    bad = {**body, "parameters": {"duration": image}}
    assert (
        requests.post(url, json=bad, headers=bearer(key), timeout=HTTP_TIMEOUT).status_code == 400
    )
    assert (
        requests.post(url, json=body, headers=bearer(SIM_KEY), timeout=HTTP_TIMEOUT).status_code
        == 401
    )
    assert (
        requests.post(
            url, json={**body, "model": key}, headers=bearer(key), timeout=HTTP_TIMEOUT
        ).status_code
        == 400
    )
    subprocess.run(
        [str(BIN_DIR / "bailian-gateway"), "keys", "revoke", revoked],
        cwd=REPO_ROOT,
        env=server.env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert (
        requests.post(url, json=body, headers=bearer(revoked), timeout=HTTP_TIMEOUT).status_code
        == 401
    )
    server.signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0

    lines = server.log_lines()  # fails on any line that is not JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "gunicorn.access", "bailian_gateway.access"} <= loggers
    assert "bailian_gateway.upstream" in loggers
    [submitted] = [
        line
        for line in lines
        if line["logger"] == "bailian_gateway.access"
        and line.get("upstream_status") == 200
        and line["route"] == "compat.submit_video_synthesis"
    ]
    assert (submitted["account"], submitted["model"], submitted["channel"]) == (
        "ops-logs",
        T2V,
        "sim",
    )
    log = server.log_path.read_text()
    for secret in (key, revoked, SIM_KEY, IMAGE_MARKER[:40]):
        assert secret not in log
        assert secret.removeprefix("sk-") not in log
    assert "Bearer" not in log


def test_an_operator_log_config_reroutes_the_access_lines(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    requests_log = tmp_path / "requests.log"
    formatter = {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": "%(levelname)s %(name)s %(message)s",
    }
    stderr = {"class": "logging.StreamHandler", "formatter": "json"}
    to_file = {"class": "logging.FileHandler", "filename": str(requests_log), "formatter": "json"}
    log_config = tmp_path / "logging.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"json": formatter},
                "handlers": {"stderr": stderr, "requests": to_file},
                "root": {"level": "INFO", "handlers": ["stderr"]},
                "loggers": {
                    "bailian_gateway.access": {"handlers": ["requests"], "propagate": False}
                },
            }
        )
    )
    server = serve(GATEWAY_LOG_CONFIG=str(log_config))

    assert requests.get(f"{server.url}/readyz", timeout=HTTP_TIMEOUT).status_code == 200
    server.signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0

    rerouted = [json.loads(line) for line in requests_log.read_text().splitlines()]
    assert "health.readyz" in {line["route"] for line in rerouted}
    log = server.log_path.read_text()
    assert "Booting worker" in log
    assert "bailian_gateway.access" not in log


# --------------------------------------------------------------------------- control socket


def test_masters_open_no_shared_control_socket_unless_given_their_own(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # gunicorn's default is one path per user ($HOME/.gunicorn/gunicorn.ctl): two masters on a
    # machine would take it from each other.
    home = tmp_path / "home"
    home.mkdir()
    first = serve(HOME=str(home))
    second = serve(HOME=str(home))
    own = tmp_path / "own.ctl"
    third = serve(HOME=str(home), GATEWAY_CONTROL_SOCKET=str(own))
    third.wait_for_log(lambda m: any("Control socket listening" in line for line in m))

    assert not (home / ".gunicorn").exists()
    assert stat.S_ISSOCK(own.stat().st_mode)
    for server in (first, second, third):
        assert server.process.poll() is None
