"""The benchmark's smoke mode, so `make bench` cannot rot between the times someone runs it.

`bench/run.py --smoke` starts the same processes as the full benchmark (fakes, the nginx
reference when nginx is installed, the gateway under the shipped gunicorn.conf.py with a
CLI-made key) and drives every scenario briefly: with wrk when it is installed, else with
a Python loop. It installs nothing. The figures are meaningless; that it all works is not.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"query_running", "query_done", "submit", "query_slow"}


def test_bench_smoke_runs_every_scenario_and_writes_the_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    [report] = tmp_path.glob("*-smoke.md")
    [raw] = tmp_path.glob("*-smoke.json")
    data = json.loads(raw.read_text())

    assert {case["key"] for case in data["cases"]} == SCENARIOS
    for case in data["cases"]:
        assert {"direct", "gateway"} <= set(case["targets"]), case["id"]
        for target, result in case["targets"].items():
            median = result["median"]
            assert median["requests"] > 0, (case["id"], target)
            assert median["errors"] == 0, (case["id"], target, result["runs"])
        # Measured to the nanosecond: handling any request at all (above) used some.
        assert case["targets"]["gateway"]["median"]["cpu_cores"] > 0
    if data["meta"]["nginx_reference"]:
        assert all("nginx" in case["targets"] for case in data["cases"])

    burst = data["burst"]
    for target, result in burst["targets"].items():
        assert result["median"]["ok"] == burst["count"], (target, result["runs"])
    assert burst["targets"]["gateway"]["median"]["peak_rss"] > 0

    text = report.read_text()
    for heading in ("## Results", "### 5.", "## Targets"):
        assert heading in text
    assert "query of a running task (upstream call)" in text
    assert len(data["checks"]) == 10


def load_bench_module(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import bench/NAME.py as the benchmark does, from its own directory."""
    path = REPO_ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{name}", module)  # its dataclasses look it up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts bench/ on the path
    spec.loader.exec_module(module)
    return module


def test_cpu_times_count_less_than_a_clock_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_times = load_bench_module("services", monkeypatch).cpu_times
    # A process that spins for 1 ms of its own CPU time (well under a 10 ms clock tick) each
    # time it is asked. Counted on its CPU clock, not by the amount of work: on a VM the time
    # the hypervisor steals is not the process's, and a fixed sum once read as 0.0 in CI.
    spin = (
        "import sys, time\n"
        "for _ in sys.stdin:\n"
        "    start = time.process_time()\n"
        "    while time.process_time() - start < 0.001:\n"
        "        pass\n"
        "    print(flush=True)"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", spin],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    try:
        worker.stdin.write("\n")
        worker.stdin.flush()
        worker.stdout.readline()  # started and warm
        used = []
        for _ in range(5):
            before = sum(cpu_times(worker.pid))
            worker.stdin.write("\n")
            worker.stdin.flush()
            worker.stdout.readline()
            used.append(sum(cpu_times(worker.pid)) - before)
    finally:
        worker.kill()
        worker.wait()

    # Whole ticks would read 0 or 10 ms and more: 1 ms of spinning (and a line read and
    # written) is neither.
    assert all(0.001 <= seconds < 0.005 for seconds in used), used
    assert cpu_times(worker.pid) == (0.0, 0.0)  # gone


def test_a_later_run_the_same_day_keeps_the_earlier_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unused_stem = load_bench_module("run", monkeypatch).unused_stem

    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24"
    (tmp_path / "2026-11-24.md").write_text("first run")
    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24-2"
    (tmp_path / "2026-11-24-2.json").write_text("{}")
    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24-3"


def test_growth_smoke_builds_both_stores_and_writes_the_report(tmp_path: Path) -> None:
    # SQLite always; PostgreSQL too when the tests have one (GATEWAY_TEST_DATABASE_URL).
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--only", "growth", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    [report] = tmp_path.glob("*-growth-smoke.md")
    [raw] = tmp_path.glob("*-growth-smoke.json")
    data = json.loads(raw.read_text())
    assert "sqlite" in data["meta"]["backends"]
    for backend in data["meta"]["backends"]:
        assert set(data["results"][backend]) == {"600", "1200"}
        for found in data["results"][backend].values():
            assert {"ownership read", "list: no filter", "reconciler pass"} <= set(found["ms"])
            assert all(ms > 0 for ms in found["ms"].values())
            # The bench checked each total against COUNT(*); the passes archived 5 x 100.
            assert found["archived"] == 500
    assert "| ownership read |" in report.read_text()
