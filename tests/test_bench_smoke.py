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


def test_a_later_run_the_same_day_keeps_the_earlier_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", REPO_ROOT / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    bench_run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", bench_run)  # its dataclasses look it up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts bench/ on the path
    spec.loader.exec_module(bench_run)
    unused_stem = bench_run.unused_stem

    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24"
    (tmp_path / "2026-11-24.md").write_text("first run")
    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24-2"
    (tmp_path / "2026-11-24-2.json").write_text("{}")
    assert unused_stem(tmp_path, "2026-11-24") == "2026-11-24-3"
