"""`make run` as a newcomer runs it: its key works and survives a restart; SIM_PORT works."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from .conftest import BIN_DIR, HTTP_TIMEOUT, REPO_ROOT, SUBMIT_PATH, T2V, _clean_environ, _free_port

pytestmark = pytest.mark.timeout(120)

KEY_LINE = re.compile(r'Your key \(account "demo", kept in [^)]+\): (sk-\S+)')


def run_quickstart(instance: Path, port: int, sim_port: int) -> tuple[subprocess.Popen[str], str]:
    """Start scripts/run-offline.sh and return it with the key it printed, once it serves."""
    env = _clean_environ() | {
        "PORT": str(port),
        "SIM_PORT": str(sim_port),
        "GATEWAY_INSTANCE_PATH": str(instance),
    }
    process = subprocess.Popen(
        ["bash", "scripts/run-offline.sh"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the script, its simulator and gunicorn: one group to stop
    )
    assert process.stdout is not None
    key = ""
    for line in process.stdout:
        if match := KEY_LINE.search(line):
            key = match.group(1)
            break
    assert key, "the script printed no key"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            for url in (
                f"http://127.0.0.1:{sim_port}/_sim/stats",
                f"http://127.0.0.1:{port}/healthz",
            ):
                requests.get(url, timeout=HTTP_TIMEOUT).raise_for_status()
            return process, key
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_quickstart(process)
    pytest.fail("the quickstart gateway never answered")


def stop_quickstart(process: subprocess.Popen[str]) -> None:
    """Stop the script's whole process group and wait for it."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    # The simulator and gunicorn outlive the script for a moment; the next run needs the ports.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)


def submit_with(port: int, key: str) -> requests.Response:
    """Submit one text-to-video task through the quickstart gateway."""
    return requests.post(
        f"http://127.0.0.1:{port}{SUBMIT_PATH}",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": T2V, "input": {"prompt": "a cat surfing"}},
        timeout=HTTP_TIMEOUT,
    )


def test_quickstart_serves_on_sim_port_and_reuses_its_key(tmp_path: Path) -> None:
    port, sim_port = _free_port(), _free_port()
    process, first_key = run_quickstart(tmp_path, port, sim_port)
    try:
        # The simulator listens where SIM_PORT says, and the gateway's channel points there.
        assert requests.get(f"http://127.0.0.1:{sim_port}/_sim/stats", timeout=HTTP_TIMEOUT).ok
        answer = submit_with(port, first_key)
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]["task_status"] == "PENDING"
    finally:
        stop_quickstart(process)
    assert (tmp_path / "demo-key").stat().st_mode & 0o077 == 0

    process, second_key = run_quickstart(tmp_path, port, sim_port)
    try:
        assert second_key == first_key
        assert submit_with(port, second_key).status_code == 200
    finally:
        stop_quickstart(process)


def test_quickstart_makes_a_new_key_when_its_key_was_revoked(tmp_path: Path) -> None:
    port, sim_port = _free_port(), _free_port()
    process, first_key = run_quickstart(tmp_path, port, sim_port)
    stop_quickstart(process)
    env = _clean_environ() | {"GATEWAY_INSTANCE_PATH": str(tmp_path)}
    subprocess.run(
        [str(BIN_DIR / "bailian-gateway"), "keys", "revoke", first_key],
        env=env,
        check=True,
        capture_output=True,
    )
    process, second_key = run_quickstart(tmp_path, port, sim_port)
    try:
        assert second_key != first_key
        assert submit_with(port, second_key).status_code == 200
        assert submit_with(port, first_key).status_code == 401
    finally:
        stop_quickstart(process)
