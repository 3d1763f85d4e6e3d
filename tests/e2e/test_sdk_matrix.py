"""Issue 24's matrix: real DashScope programs on several `dashscope` releases, end to end.

Each release is installed from PyPI into a virtualenv of its own (.sdk-venvs/<version>,
reused while it holds that version), and the programs in sdk_programs/ run with that
virtualenv's python against the session's gunicorn and simulator, as a user's program would.
The tests then check both what the program printed and what the gateway and DashScope saw.

- 1.21.0 is the oldest release whose `VideoSynthesis` has `async_call` (1.20.14 and every
  earlier one have no `dashscope.aigc.video_synthesis` at all); it has cancel and list, no
  `AioVideoSynthesis`, no `first_frame_url`, and `OssUtils.upload` returns a bare URL.
- 1.27.8 is the newest 1.x: `AioVideoSynthesis`, first/last frame (kf2v to image2video).
- 2.0.2 adds `Client` and `AsyncClient` (`videos.jobs` create, wait, cancel, list).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, select

from app.store.tables import accounts, tasks, uploads

from .conftest import (
    I2V,
    KF2V,
    REPO_ROOT,
    S2V,
    S2V_DETECT,
    SIM_KEY,
    T2V,
    UPSTREAM_KF2V_SUBMIT_PATH,
    UPSTREAM_SUBMIT_PATH,
    Gateway,
    Keys,
    Simulator,
    _clean_environ,
    bearer,
)

VERSIONS = ("1.21.0", "1.27.8", "2.0.2")
# What each release lacks of what the programs try, as the programs report it.
V1_ABSENT = {
    "1.21.0": {"AioVideoSynthesis", "first_frame_url", "face_detect"},
    "1.27.8": {"face_detect"},
    "2.0.2": {"face_detect"},
}
HAS_CLIENT = {"1.21.0": False, "1.27.8": False, "2.0.2": True}
VENV_ROOT = REPO_ROOT / ".sdk-venvs"
PROGRAMS = Path(__file__).parent / "sdk_programs"
MODELS = {"t2v": T2V, "i2v": I2V, "kf2v": KF2V, "s2v": S2V, "s2v_detect": S2V_DETECT}
INSTALL_TIMEOUT = 600  # seconds for one `pip install dashscope==V` and its dependencies
PROGRAM_TIMEOUT = 120  # seconds for one program; each takes 10-30 s here

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 2 * PROGRAM_TIMEOUT)


def installed_version(python: Path) -> str | None:
    """Return the dashscope version a virtualenv's python imports, None if it cannot."""
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "from dashscope.version import __version__; print(__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def sdk_python(version: str) -> Path:
    """Return the python of a virtualenv holding dashscope==version, building it if needed."""
    VENV_ROOT.mkdir(exist_ok=True)
    venv = VENV_ROOT / version
    python = venv / "bin" / "python"
    # Another pytest process (or xdist worker) may be building the same one: take turns.
    with (VENV_ROOT / f"{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(python) == version:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"dashscope=={version}",
            ],
        ]
        for step in steps:
            try:
                done = subprocess.run(
                    step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.fail(f"building the dashscope {version} virtualenv timed out: {step}")
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.fail(
                    f"building the dashscope {version} virtualenv failed: {step}\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
        assert installed_version(python) == version, f"{venv} does not import dashscope {version}"
        return python


@dataclass(frozen=True)
class Run:
    """One program's run: its account's keys, what it printed, what the simulator counted."""

    version: str
    account: str
    key: str
    other_key: str
    results: dict[str, Any]
    seconds: float
    checks: int  # synchronous checks that reached the simulator during the run


def run_program(
    gateway: Gateway, simulator: Simulator, program: str, version: str, tmp: Path
) -> Run:
    """Run one SDK program with the version's python for a fresh account; parse its JSON."""
    python = sdk_python(version)
    account = f"e2e-sdk-{program.split('_')[0]}-{version}"
    key, other_key = gateway.create_key(account), gateway.create_key(account)
    image = tmp / f"frame-{program}-{version}.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n a frame for " + version.encode())
    tag = f"[sdk {program} {version} {gateway.backend}]"
    checks = simulator.stats()["checks"]
    started = time.monotonic()
    done = subprocess.run(
        [
            str(python),
            str(PROGRAMS / program),
            gateway.api,
            key,
            str(image),
            tag,
            json.dumps(MODELS),
        ],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        env={**_clean_environ(), "PYTHONUNBUFFERED": "1"},
        cwd=tmp,
        check=False,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"{program} on dashscope {version} failed:\n{done.stderr[-5000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["sdk_version"] == version
    return Run(
        version=version,
        account=account,
        key=key,
        other_key=other_key,
        results=results,
        seconds=seconds,
        checks=simulator.stats()["checks"] - checks,
    )


@pytest.fixture(scope="module", params=VERSIONS)
def v1_run(
    request: pytest.FixtureRequest,
    gateway: Gateway,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """Run sdk_programs/v1_video.py once per version and gateway."""
    return run_program(
        gateway, simulator, "v1_video.py", request.param, tmp_path_factory.mktemp("sdk-v1")
    )


@pytest.fixture(scope="module", params=VERSIONS)
def v2_run(
    request: pytest.FixtureRequest,
    gateway: Gateway,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """Run sdk_programs/v2_video.py once per version and gateway."""
    return run_program(
        gateway, simulator, "v2_video.py", request.param, tmp_path_factory.mktemp("sdk-v2")
    )


def store_rows(gateway: Gateway, account: str) -> tuple[dict[str, str], dict[str, str]]:
    """Return the account's tasks (task_id: model) and upload dirs (dir: model) in the store."""
    engine = create_engine(gateway.env["GATEWAY_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            account_id = conn.execute(
                select(accounts.c.id).where(accounts.c.name == account)
            ).scalar_one()
            owned = conn.execute(
                select(tasks.c.task_id, tasks.c.model).where(tasks.c.account_id == account_id)
            ).all()
            dirs = conn.execute(
                select(uploads.c.upload_dir, uploads.c.model).where(
                    uploads.c.account_id == account_id
                )
            ).all()
    finally:
        engine.dispose()
    return {row.task_id: row.model for row in owned}, {row.upload_dir: row.model for row in dirs}


def upstream_tasks(simulator: Simulator) -> dict[str, dict[str, Any]]:
    """Return every task the simulator holds, by id."""
    return {task["task_id"]: task for task in simulator.stats()["task_list"]}


def assert_owned_and_sent_once(
    gateway: Gateway, simulator: Simulator, keys: Keys, run: Run
) -> None:
    """Check each reported task: the account's in the store, one submit upstream, visible."""
    reported = run.results["tasks"]
    owned, _ = store_rows(gateway, run.account)
    # Every task the account has is one the program reported, and the other way round.
    assert set(owned) == {task["task_id"] for task in reported.values()}, owned
    stats = simulator.stats()
    by_id = {task["task_id"]: task for task in stats["task_list"]}
    for step, task in reported.items():
        assert owned[task["task_id"]] == task["model"], step
        upstream = by_id[task["task_id"]]
        assert (upstream["model"], upstream["prompt"]) == (task["model"], task["prompt"]), step
        assert upstream["owner_hint"] == SIM_KEY[-6:], step
        # Each submit reached DashScope once: no resend made a second task.
        assert stats["submits_by_prompt"][task["prompt"]] == 1, step
        # Another key of the account sees it, with the status the program saw last.
        seen = requests.get(
            f"{gateway.api}/tasks/{task['task_id']}", headers=bearer(run.other_key), timeout=30
        )
        assert seen.status_code == 200, seen.text
        assert seen.json()["output"]["task_status"] == task["status"], step
        # Another account does not.
        foreign = requests.get(
            f"{gateway.api}/tasks/{task['task_id']}", headers=bearer(keys.bob), timeout=30
        )
        assert (foreign.status_code, foreign.json()["code"]) == (400, "task_not_exist"), step


def assert_uploaded_for_account(
    gateway: Gateway, simulator: Simulator, run: Run, fields: dict[str, list[str]]
) -> list[str]:
    """Check that each step's image fields reached upstream as oss:// under the account's dirs."""
    _, dirs = store_rows(gateway, run.account)
    by_id = upstream_tasks(simulator)
    urls = []
    for step, names in fields.items():
        task = run.results["tasks"][step]
        sent = by_id[task["task_id"]]["input"]
        for name in names:
            url = sent[name]
            assert url.startswith("oss://"), (step, name, url)
            # The upload dir getPolicy gave this account, for the model of the submit.
            directory = url.removeprefix("oss://").rsplit("/", 1)[0]
            assert dirs.get(directory) == task["model"], (step, name, url, dirs)
            urls.append(url)
    return urls


def test_v1_tasks_end_as_submitted(v1_run: Run, simulator: Simulator) -> None:
    results = v1_run.results
    statuses = {step: task["status"] for step, task in results["tasks"].items()}
    expected = {
        "call": "SUCCEEDED",
        "async_call": "SUCCEEDED",
        "cancel": "CANCELED",
        "file_image": "SUCCEEDED",
        "explicit_upload": "SUCCEEDED",
        "first_last_frame": "SUCCEEDED",
        "image2video": "SUCCEEDED",
    }
    if "AioVideoSynthesis" not in V1_ABSENT[v1_run.version]:
        expected["aio"] = "SUCCEEDED"
        assert results["aio_fetch_status"] in ("PENDING", "RUNNING", "SUCCEEDED")
    assert statuses == expected
    assert results["async_call_status"] == "PENDING"
    assert results["fetch_status"] in ("PENDING", "RUNNING", "SUCCEEDED")
    assert results["call_video_url"].startswith(simulator.url)
    # The cancel found the task PENDING (it is held 30 s) and DashScope took it.
    assert results["held_status"] == "PENDING"
    assert results["cancel_status_code"] == 200
    assert v1_run.seconds < 60, f"the 1.x program took {v1_run.seconds:.0f} s"


def test_v1_reports_exactly_what_the_release_lacks(v1_run: Run) -> None:
    assert set(v1_run.results["absent"]) == V1_ABSENT[v1_run.version]
    via = "extra_input" if "first_frame_url" in V1_ABSENT[v1_run.version] else "first_frame_url"
    assert v1_run.results["first_last_frame_via"] == via


def test_v1_sends_each_model_to_its_route(v1_run: Run, simulator: Simulator) -> None:
    by_id = upstream_tasks(simulator)
    paths = {step: by_id[task["task_id"]]["path"] for step, task in v1_run.results["tasks"].items()}
    # Releases with first_frame_url send kf2v models to image2video; 1.21.0 knows no kf2v and
    # sends it where every other video goes, which DashScope (and the gateway) also serves.
    kf2v_path = (
        UPSTREAM_SUBMIT_PATH
        if "first_frame_url" in V1_ABSENT[v1_run.version]
        else UPSTREAM_KF2V_SUBMIT_PATH
    )
    expected = dict.fromkeys(paths, UPSTREAM_SUBMIT_PATH)
    expected |= {"first_last_frame": kf2v_path, "image2video": UPSTREAM_KF2V_SUBMIT_PATH}
    assert paths == expected


def test_v1_tasks_are_the_accounts_and_sent_once(
    v1_run: Run, gateway: Gateway, simulator: Simulator, keys: Keys
) -> None:
    assert_owned_and_sent_once(gateway, simulator, keys, v1_run)


def test_v1_list_returns_the_programs_tasks(v1_run: Run) -> None:
    assert v1_run.results["list_status_code"] == 200
    # The list ran before the aio step, so that one task is not in it.
    expected = {task["task_id"] for step, task in v1_run.results["tasks"].items() if step != "aio"}
    assert set(v1_run.results["listed_task_ids"]) == expected


def test_v1_files_reach_upstream_under_the_accounts_upload_dirs(
    v1_run: Run, gateway: Gateway, simulator: Simulator
) -> None:
    fields = {
        "file_image": ["img_url"],
        "explicit_upload": ["img_url"],
        "first_last_frame": ["first_frame_url", "last_frame_url"],
    }
    if "aio" in v1_run.results["tasks"]:
        fields["aio"] = ["img_url"]
    urls = assert_uploaded_for_account(gateway, simulator, v1_run, fields)
    # The explicit upload's URL is the one the submit named, unchanged.
    by_id = upstream_tasks(simulator)
    explicit = by_id[v1_run.results["tasks"]["explicit_upload"]["task_id"]]["input"]
    assert explicit["img_url"] == v1_run.results["uploaded_url"]
    assert len(set(urls)) == len(urls)  # each upload is a file of its own


def test_v1_image2video_after_its_check(v1_run: Run, simulator: Simulator) -> None:
    check = v1_run.results["check"]
    assert check["status_code"] == 200, check
    assert check["body"]["output"]["check_pass"] is True
    assert v1_run.checks == 1  # the check reached DashScope once, synchronously
    task = v1_run.results["tasks"]["image2video"]
    sent = upstream_tasks(simulator)[task["task_id"]]
    assert sent["model"] == S2V
    assert sent["path"] == UPSTREAM_KF2V_SUBMIT_PATH  # task="image2video" picked the route
    assert set(sent["input"]) >= {"image_url", "audio_url"}


def test_v2_client_and_async_client(
    v2_run: Run, gateway: Gateway, simulator: Simulator, keys: Keys
) -> None:
    results = v2_run.results
    if not HAS_CLIENT[v2_run.version]:
        # A 1.x release: the program found no Client and did nothing else.
        assert set(results["absent"]) == {"Client"}
        assert results["tasks"] == {}
        return
    assert results["absent"] == {}
    statuses = {step: task["status"] for step, task in results["tasks"].items()}
    assert statuses == {
        "create": "SUCCEEDED",
        "file_image": "SUCCEEDED",
        "first_last_frame": "SUCCEEDED",
        "cancel": "CANCELED",
        "async_create": "SUCCEEDED",
    }
    assert results["created_status"] == "PENDING"
    assert results["held_status"] == "PENDING"
    synchronous = {
        task["task_id"]: task["status"]
        for step, task in results["tasks"].items()
        if step != "async_create"
    }
    assert results["listed"] == synchronous
    assert results["list_total"] == len(synchronous)
    assert results["async_listed"] == {
        task["task_id"]: task["status"] for task in results["tasks"].values()
    }
    assert_owned_and_sent_once(gateway, simulator, keys, v2_run)
    assert_uploaded_for_account(
        gateway,
        simulator,
        v2_run,
        {
            "file_image": ["img_url"],
            "first_last_frame": ["first_frame_url", "last_frame_url"],
            "async_create": ["img_url"],
        },
    )
    assert v2_run.seconds < 60, f"the 2.x program took {v2_run.seconds:.0f} s"
