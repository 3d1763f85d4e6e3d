"""Operating the gateway under gunicorn: reloads and stops, metrics over workers, JSON logs.

These tests signal their gunicorn master (HUP, TERM), so each one starts its own with
conftest.py's start_gateway (the shipped gunicorn.conf.py), next to the session's simulator
and database; the reload of `make serve` signals scripts/serve.sh, started as
test_slow_clients.py starts it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import bindparam, create_engine, text

from .conftest import (
    HTTP_TIMEOUT,
    SIM_KEY,
    SUBMIT_PATH,
    T2V,
    Gateway,
    Simulator,
    _reserve_closed_port,
    assert_native_error,
    bearer,
    query,
    start_gateway,
    stop,
    submit,
)
from .test_slow_clients import Stack, command_of, start_stack, stop_stack

SLOW_SECONDS = 2.0
SLOW_PROMPT = f"[sleep={SLOW_SECONDS}] in flight"
# A base64 image as clients send them: its text must never reach a log.
IMAGE_MARKER = base64.b64encode(b"\x89PNG-e2e-never-log-this-" * 8).decode()


def booted(messages: list[str]) -> list[str]:
    """Return the pids of the workers gunicorn booted, in order."""
    prefix = "Booting worker with pid: "
    return [m.removeprefix(prefix) for m in messages if m.startswith(prefix)]


def exited(messages: list[str]) -> list[str]:
    """Return the pids of the workers that exited."""
    return [m.removeprefix("Worker exiting (pid: ").rstrip(")") for m in messages if "exiting" in m]


@pytest.fixture
def serve(
    database_url: str, simulator: Simulator, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """Return a function that starts a gunicorn (2 workers x 8 threads) with extra env.

    Unlike the session's gateway, these run with a 30 s graceful timeout, no access log unless
    a test asks for one (so the log is gunicorn's and the app's JSON lines only), and no
    XDG_RUNTIME_DIR (so the control-socket test sees gunicorn's own default).
    """
    config = textwrap.dedent(
        f"""
        [upstream]
        connect_timeout = 2
        read_timeout = 10

        [tasks]
        refresh_interval = 0
        reconcile_interval = 0

        [[channels]]
        name = "sim"
        base_url = "{simulator.url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{T2V}"]

        [models."{T2V}".price_per_second]
        "480P" = 0.3
        """
    )
    started: list[Gateway] = []

    def start(settings_file: str = "gunicorn.conf.py", **extra: str) -> Gateway:
        server = start_gateway(
            tmp_path / f"gunicorn-{len(started)}",
            database_url,
            config,
            {"GATEWAY_GRACEFUL_TIMEOUT": "30", **extra},
            access_log=None,
            own_runtime_dir=False,
            settings_file=settings_file,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        stop(server.process, timeout=30)


class InFlight:
    """Slow submits running in threads, started and then waited for."""

    def __init__(self, server: Gateway, key: str, count: int) -> None:
        self.answers: list[requests.Response | Exception] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._submit, args=(server, key)) for _ in range(count)
        ]

    def _submit(self, server: Gateway, key: str) -> None:
        try:
            answer: requests.Response | Exception = submit(server, key, prompt=SLOW_PROMPT)
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
    serve: Callable[..., Gateway], simulator: Simulator
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
    assert [query(server, key, task_id).status_code for task_id in task_ids] == [200] * 4
    assert server.process.poll() is None


ADDED_MODEL = "wan-e2e-added-on-reload"
# What the fixed file adds: a model on the session's simulator, with a price, so it is offered.
ADDED = f"""
[[channels]]
name = "sim-added"
base_url = "{{base_url}}"
api_key_env = "E2E_SIM_KEY"
models = ["{ADDED_MODEL}"]

[models."{ADDED_MODEL}".price_per_second]
"480P" = 0.3
"""
# A channel whose key variable the master never had: exporting it in a shell after gunicorn
# started does not reach the master (README, "Adding a channel").
UNSET_KEY_CHANNEL = f"""
[[channels]]
name = "sim-new-key"
base_url = "{{base_url}}"
api_key_env = "E2E_KEY_EXPORTED_TOO_LATE"
models = ["{ADDED_MODEL}"]
"""


def refusals(messages: list[str]) -> list[str]:
    """Return the master's messages refusing a reload."""
    return [m for m in messages if m.startswith("reload refused")]


def submit_added(server: Gateway, key: str) -> requests.Response:
    """Submit a task of the model the fixed configuration adds."""
    return submit(server, key, model=ADDED_MODEL)


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        pytest.param("\n[upstream\nread_timeout = 3\n", "not valid TOML", id="toml-typo"),
        pytest.param(
            UNSET_KEY_CHANNEL,
            "channels[1].api_key_env: environment variable E2E_KEY_EXPORTED_TOO_LATE is not set",
            id="channel-key-unset",
        ),
    ],
)
def test_a_reload_with_a_mistake_keeps_serving_and_the_fixed_file_applies(
    serve: Callable[..., Gateway], simulator: Simulator, mistake: str, expected: str
) -> None:
    server = serve()
    key = server.create_key("ops-reload-mistake")
    server.wait_for_log(lambda m: len(booted(m)) == 2)
    config = Path(server.env["GATEWAY_CONFIG"])
    good = config.read_text()
    config.write_text(good + mistake.format(base_url=simulator.url))

    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(refusals(m)) == 1)

    [refused] = refusals(server.messages())
    assert f"{config}: " in refused
    assert expected in refused
    assert server.process.poll() is None
    assert [submit(server, key).status_code for _ in range(4)] == [200] * 4
    assert submit_added(server, key).status_code == 400  # not offered yet
    messages = server.messages()
    assert (len(booted(messages)), exited(messages)) == (2, [])  # the same workers serve

    config.write_text(good + ADDED.format(base_url=simulator.url))
    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(booted(m)) == 4 and len(exited(m)) == 2)

    assert submit_added(server, key).status_code == 200
    assert len(refusals(server.messages())) == 1
    assert server.process.poll() is None


def test_a_reload_with_a_broken_gunicorn_settings_file_keeps_serving(
    serve: Callable[..., Gateway], tmp_path: Path
) -> None:
    settings = tmp_path / "gunicorn.conf.py"
    shipped = (Path(__file__).resolve().parents[2] / "gunicorn.conf.py").read_text()
    settings.write_text(shipped)
    server = serve(settings_file=str(settings))
    server.wait_for_log(lambda m: len(booted(m)) == 2)
    settings.write_text(
        shipped + "\nthreads = int(os.environ.get('GATEWAY_NO_SUCH_VARIABLE', 'eight'))\n"
    )

    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(refusals(m)) == 1)

    [refused] = refusals(server.messages())
    assert str(settings) in refused
    assert "ValueError: invalid literal for int() with base 10: 'eight'" in refused
    assert requests.get(f"{server.url}/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    settings.write_text(shipped + "\nworkers = 3\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(booted(m)) == 5 and len(exited(m)) == 2)
    assert server.process.poll() is None


def submit_too_large_for_nginx(stack: Stack) -> requests.Response:
    """Submit 2 MiB of not-JSON through nginx: over a 1 MiB body limit, under the shipped one."""
    return requests.post(
        f"{stack.url}{SUBMIT_PATH}",
        data=b"x" * (2 * 1024 * 1024),
        headers={**bearer(stack.key), "Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT,
    )


def test_a_hup_to_make_serve_refuses_a_mistake_and_applies_the_fixed_file_to_both(
    simulator: Simulator, tmp_path: Path
) -> None:
    # systemd's ExecReload=/bin/kill -HUP $MAINPID: under `make serve` the main pid is serve.sh.
    closed = _reserve_closed_port()
    stack = start_stack(tmp_path, simulator, closed.getsockname()[1])
    children = stack.children()
    try:
        assert set(children) == {"gunicorn", "nginx"}, stack.log()
        stack.wait_for_log(lambda m: len(booted(m)) == 2)
        config = tmp_path / "gateway.toml"
        good = config.read_text()
        # Under the shipped 20 MiB limit nginx passes it on, and the app refuses it (its own id).
        passed_on = assert_native_error(submit_too_large_for_nginx(stack), 400, "InvalidParameter")
        assert len(passed_on["request_id"]) == 36, passed_on

        config.write_text(good + "\n[upstream\nread_timeout = 3\n")
        stack.process.send_signal(signal.SIGHUP)
        stack.wait_for_log(lambda m: len(refusals(m)) == 1)

        assert "not valid TOML" in refusals(stack.messages())[0]
        deadline = time.monotonic() + 10
        while "serve: nginx not reloaded" not in stack.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.1)
        assert [submit(stack, stack.key).status_code for _ in range(4)] == [200] * 4
        assert submit_added(stack, stack.key).status_code == 400  # not offered yet
        assert stack.process.poll() is None, stack.log()
        assert stack.children() == children  # the same gunicorn and nginx masters
        messages = stack.messages()
        assert (len(booted(messages)), exited(messages)) == (2, [])  # and the same workers

        # The fixed file adds a model, and lowers the body limit nginx takes from it.
        fixed = good.replace("[server]\n", "[server]\nmax_body_bytes = 1048576\n", 1)
        config.write_text(fixed + ADDED.format(base_url=simulator.url))
        stack.process.send_signal(signal.SIGHUP)
        stack.wait_for_log(lambda m: len(booted(m)) == 4 and len(exited(m)) == 2)

        assert submit_added(stack, stack.key).status_code == 200
        # nginx reloaded on the refilled config: it refuses the body itself, with its own id
        # (the reloaded app would refuse it too, with a UUID, had nginx let it through).
        deadline = time.monotonic() + 10
        while True:
            too_large = submit_too_large_for_nginx(stack)
            if too_large.status_code == 413 and len(too_large.json()["request_id"]) == 32:
                break
            assert time.monotonic() < deadline, (too_large.text, stack.log())
            time.sleep(0.2)
        assert_native_error(too_large, 413, "BadRequest.TooLarge")
        assert len(refusals(stack.messages())) == 1
        assert stack.process.poll() is None, stack.log()
        assert stack.children() == children
    finally:
        status = stop_stack(stack)
        closed.close()
        # What a serve.sh killed by the HUP would have left running, unsupervised.
        orphans = {name: pid for name, pid in children.items() if name in command_of(pid)}
        for pid in orphans.values():
            os.kill(pid, signal.SIGTERM)
    assert not orphans, f"serve.sh left {orphans} running:\n{stack.log()}"
    assert status == 0, f"serve.sh did not stop cleanly on TERM after its reloads:\n{stack.log()}"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_workers_each_run_on_one_cpu_spread_over_the_cpus_across_a_reload(
    serve: Callable[..., Gateway],
) -> None:
    server = serve()
    server.wait_for_log(lambda m: len(booted(m)) == 2)
    first = booted(server.messages())
    first_cpus = [os.sched_getaffinity(int(pid)) for pid in first]

    server.signal(signal.SIGHUP)
    server.wait_for_log(lambda m: len(booted(m)) == 4 and set(first) <= set(exited(m)))
    second = booted(server.messages())[2:]
    second_cpus = [os.sched_getaffinity(int(pid)) for pid in second]

    spread = min(2, len(os.sched_getaffinity(0)))  # two workers, on as many CPUs as there are
    for cpus in (first_cpus, second_cpus):
        assert all(len(one) == 1 for one in cpus)
        assert len(set().union(*cpus)) == spread


def test_a_load_running_through_reloads_sees_no_failed_request(
    serve: Callable[..., Gateway],
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
                    submitted = submit(server, key, prompt="[sleep=0.05] load", session=session)
                    queried = submitted.status_code
                    if submitted.status_code == 200:
                        task_id = submitted.json()["output"]["task_id"]
                        with lock:
                            task_ids.append(task_id)
                        queried = query(server, key, task_id, session=session).status_code
                    result: list[tuple[str, int | str]] = [
                        ("submit", submitted.status_code),
                        ("query", queried),
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
    recorded = [query(server, key, task_id).status_code for task_id in task_ids]
    assert recorded == [200] * len(task_ids)


def test_term_lets_in_flight_requests_finish_before_the_master_exits(
    serve: Callable[..., Gateway], simulator: Simulator, database_url: str
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


def scrape(server: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
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
    serve: Callable[..., Gateway], tmp_path: Path
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
    serve: Callable[..., Gateway],
) -> None:
    server = serve()
    [announced] = [m for m in server.messages() if m.startswith("metrics of the workers")]
    directory = Path(announced.rsplit(" ", 1)[-1])
    assert directory.is_dir()

    server.signal(signal.SIGTERM)

    assert server.process.wait(timeout=30) == 0
    assert not directory.exists()


def test_the_gunicorn_log_is_json_lines_without_keys_or_bodies(
    serve: Callable[..., Gateway],
) -> None:
    # At debug, the answered upstream calls log a line each too: every kind of line is scanned.
    server = serve(GATEWAY_ACCESS_LOG="-", GATEWAY_LOG_LEVEL="debug")
    key = server.create_key("ops-logs")
    revoked = server.create_key("ops-logs")
    image = f"data:image/png;base64,{IMAGE_MARKER}"
    body = {"model": T2V, "input": {"prompt": "p", "img_url": image}}
    url = f"{server.url}{SUBMIT_PATH}"
    accepted = requests.post(url, json=body, headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert accepted.status_code == 200
    task_id = accepted.json()["output"]["task_id"]
    assert query(server, key, task_id).status_code == 200
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
    server.cli("keys", "revoke", revoked)
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
    assert {line["level"] for line in lines if line["logger"] == "bailian_gateway.upstream"} == {
        "DEBUG"
    }
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
    serve: Callable[..., Gateway], tmp_path: Path
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
    serve: Callable[..., Gateway], tmp_path: Path
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
