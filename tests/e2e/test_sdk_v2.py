"""The official SDK's 2.x API (`dashscope.v2.Client`) against the real gateway."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from dashscope.v2 import Client
from dashscope.v2.errors import DashScopeError

from .conftest import (
    SIM_KEY,
    SLOW_MODEL,
    SLOW_PROMPT,
    T2V,
    UPSTREAM_SUBMIT_PATH,
    Gateway,
    Keys,
    Simulator,
)

if TYPE_CHECKING:
    from dashscope.v2.resources._jobs import Job

# How long the simulator sleeps on SLOW_PROMPT before it creates the task.
SLEEP_SECONDS = float(re.search(r"\[sleep=([0-9.]+)\]", SLOW_PROMPT)[1])  # type: ignore[index]


def wait(client: Client, job: Job | str) -> Job:
    """Wait for a job with short polls (the simulator finishes a task in about 1 s)."""
    return client.videos.jobs.wait(job, poll_interval=0.2, max_interval=0.5, timeout=30)


@pytest.fixture
def make_client(gateway: Gateway) -> Iterator[Callable[[str], tuple[Client, list[httpx.Request]]]]:
    """Return a factory of v2 clients on the gateway, each with the requests it sent."""
    clients: list[Client] = []

    def make(api_key: str) -> tuple[Client, list[httpx.Request]]:
        client = Client(api_key=api_key, base_url=gateway.api)
        clients.append(client)
        # Observe what the SDK puts on the wire through httpx's event hooks; nothing changes.
        sent: list[httpx.Request] = []
        client.transport.http_client.event_hooks = {"request": [sent.append], "response": []}
        return client, sent

    yield make
    for client in clients:
        client.close()


def test_jobs_create_and_wait_succeed(
    make_client: Callable[[str], tuple[Client, list[httpx.Request]]],
    gateway: Gateway,
    keys: Keys,
    simulator: Simulator,
) -> None:
    client, sent = make_client(keys.alice)

    job = client.videos.jobs.create(
        model=T2V,
        prompt="a paper boat on a river",
        resolution="720P",
        duration=5,
        extra_input={"e2e_extra": "kept"},
        parameters={"e2e_parameter": 7},
    )
    assert job.task_id
    assert job.status == "PENDING"

    submits = [r for r in sent if r.method == "POST"]
    assert len(submits) == 1
    assert str(submits[0].url) == f"{gateway.api}/services/aigc/video-generation/video-synthesis"
    upstream = simulator.last_submit()
    assert upstream["path"] == UPSTREAM_SUBMIT_PATH
    assert upstream["body"] == json.loads(submits[0].content)
    assert upstream["body"]["input"]["e2e_extra"] == "kept"
    assert upstream["body"]["parameters"]["e2e_parameter"] == 7
    assert upstream["headers"]["authorization"] == f"Bearer {SIM_KEY}"
    assert upstream["headers"]["x-dashscope-async"] == "enable"

    done = wait(client, job)
    assert done.task_id == job.task_id
    assert done.status == "SUCCEEDED"
    assert done.succeeded
    assert done.video_url
    assert job.task_id in done.video_url
    assert all(r.headers["Authorization"] == f"Bearer {keys.alice}" for r in sent)


def test_fetch_by_another_key_of_the_account(
    make_client: Callable[[str], tuple[Client, list[httpx.Request]]], keys: Keys
) -> None:
    alice, _ = make_client(keys.alice)
    alice_second, _ = make_client(keys.alice_second)

    job = alice.videos.jobs.create(model=T2V, prompt="one account, two keys")
    done = wait(alice_second, job.task_id)
    assert done.status == "SUCCEEDED"
    assert done.video_url


def test_failed_job_raises_with_its_code(
    make_client: Callable[[str], tuple[Client, list[httpx.Request]]], keys: Keys
) -> None:
    client, _ = make_client(keys.alice)
    job = client.videos.jobs.create(model=T2V, prompt="[fail] this one fails")

    with pytest.raises(DashScopeError) as raised:
        wait(client, job)
    assert raised.value.code == "InternalError.Algo"


def test_foreign_task_is_task_not_exist(
    make_client: Callable[[str], tuple[Client, list[httpx.Request]]], keys: Keys
) -> None:
    alice, _ = make_client(keys.alice)
    bob, _ = make_client(keys.bob)
    job = alice.videos.jobs.create(model=T2V, prompt="alice's video")

    with pytest.raises(DashScopeError) as raised:
        bob.videos.jobs.fetch(job.task_id)
    assert raised.value.code == "task_not_exist"
    assert raised.value.status_code == 400


def test_a_timed_out_submit_is_sent_once(
    make_client: Callable[[str], tuple[Client, list[httpx.Request]]],
    keys: Keys,
    simulator: Simulator,
) -> None:
    # SDK 2.x resends a POST on a 504 unless told not to: a second video would be billed.
    client, sent = make_client(keys.alice)
    prompt = f"{SLOW_PROMPT} {uuid.uuid4()}"

    with pytest.raises(DashScopeError) as raised:
        client.videos.jobs.create(model=SLOW_MODEL, prompt=prompt)
    assert raised.value.status_code == 504

    assert len([r for r in sent if r.method == "POST"]) == 1
    # The simulator creates the task once its sleep is over, for each submit that reached it.
    time.sleep(SLEEP_SECONDS + 1)
    assert simulator.stats()["submits_by_prompt"].get(prompt) == 1
