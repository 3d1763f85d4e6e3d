"""Requests take turns in arrival order, and give their place up while they wait elsewhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses
from flask import Flask

from app.config import ConfigError
from app.turns import Turns
from tests.conftest import BASE_CONFIG, PRIMARY, SUBMIT_PATH, bearer, new_key

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
SUBMIT_URL = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
SUBMIT_BODY = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
ONE_AT_A_TIME = BASE_CONFIG + "\n[server]\nrequests_at_once = 1\n"


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Poll until the condition holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def queue_up(turns: Turns, name: str, order: list[str]) -> threading.Thread:
    """Start a thread that takes a turn, notes its name, and leaves; return once it waits."""

    def run() -> None:
        turns.take()
        order.append(name)
        turns.give_up()

    waiting = turns.waiting
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: turns.waiting == waiting + 1)
    return thread


def test_places_go_in_arrival_order() -> None:
    turns, order = Turns(1), []
    turns.take()
    threads = [queue_up(turns, name, order) for name in "abcd"]

    turns.give_up()
    for thread in threads:
        thread.join(5)

    assert order == ["a", "b", "c", "d"]
    # Everyone left: the place is free again.
    turns.take()


def test_two_places_let_two_in_and_the_third_waits() -> None:
    turns, order = Turns(2), []
    turns.take()
    turns.take()
    third = queue_up(turns, "third", order)
    assert order == []

    turns.give_up()
    third.join(5)

    assert order == ["third"]


def test_a_request_waiting_elsewhere_lets_the_next_in_and_queues_again_behind_it() -> None:
    turns, order = Turns(1), []
    turns.take()
    first = queue_up(turns, "first", order)

    with turns.set_aside():
        first.join(5)
        assert order == ["first"]  # came in while the place was set aside
        # Someone who held the place meanwhile makes the returning request wait its turn.
        turns.take()
        late = queue_up(turns, "late", order)
        back = threading.Thread(target=lambda: turns.give_up(), daemon=True)
        back.start()
        back.join(5)
        late.join(5)
    order.append("back")

    assert order == ["first", "late", "back"]


def test_without_a_limit_no_one_waits() -> None:
    turns = Turns(0)
    for _ in range(100):
        turns.take()
    with turns.set_aside():
        turns.take()
    assert turns.waiting == 0


def test_a_negative_number_of_places_is_refused() -> None:
    with pytest.raises(ValueError, match="places"):
        Turns(-1)


# ---------------------------------------------------------------- in the app: one place a worker


@pytest.fixture
def one_at_a_time(make_app: Callable[..., Flask]) -> Iterator[Flask]:
    """Return the gateway app with one request at work at a time."""
    app = make_app(ONE_AT_A_TIME)
    yield app
    app.extensions["gateway"].engine.dispose()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `call` on a thread of its own; return the thread and a list that gets its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def accept_submits(upstream: responses.RequestsMock) -> None:
    """Have DashScope accept a submit as TASK_ID."""
    upstream.post(
        SUBMIT_URL,
        json={"request_id": "s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}},
    )


def test_a_query_waiting_on_dashscope_leaves_its_place_to_other_requests(
    one_at_a_time: Flask, upstream: responses.RequestsMock
) -> None:
    app, key = one_at_a_time, new_key(one_at_a_time)
    accept_submits(upstream)
    client = app.test_client()
    assert client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(key)).status_code == 200
    asked, answer_now = threading.Event(), threading.Event()

    def slow_dashscope(_request: Any) -> tuple[int, dict[str, str], str]:
        asked.set()
        answer_now.wait(10)
        return 200, {}, '{"request_id": "q", "output": {"task_status": "RUNNING"}}'

    upstream.add_callback(responses.GET, f"{PRIMARY}/api/v1/tasks/{TASK_ID}", slow_dashscope)
    waiting, _ = in_thread(
        lambda: client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(key))
    )
    assert asked.wait(5)

    listing, listed = in_thread(lambda: client.get("/alibailian/api/v1/tasks", headers=bearer(key)))
    listing.join(5)
    answered = not listing.is_alive()
    answer_now.set()
    waiting.join(5)

    assert answered, "the listing waited for the query's DashScope call"
    assert listed[0].status_code == 200


class _SlowUpload:
    """A request body that arrives only when the test says so."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.position = 0
        self.started = threading.Event()
        self.arrive = threading.Event()

    def read(self, size: int = -1) -> bytes:
        self.started.set()
        self.arrive.wait(10)
        end = len(self.body) if size < 0 else self.position + size
        chunk, self.position = self.body[self.position : end], min(end, len(self.body))
        return chunk

    # The test client measures the body with tell and seek before it sends it.
    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else len(self.body) + offset
        return self.position


def test_a_slow_upload_leaves_its_place_to_other_requests(
    one_at_a_time: Flask, upstream: responses.RequestsMock
) -> None:
    app, key = one_at_a_time, new_key(one_at_a_time)
    accept_submits(upstream)
    body = b'{"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}'
    upload = _SlowUpload(body)
    client = app.test_client()
    headers = {**bearer(key), "Content-Type": "application/json", "Content-Length": str(len(body))}
    uploading, submitted = in_thread(
        lambda: client.post(SUBMIT_PATH, input_stream=upload, headers=headers)
    )
    assert upload.started.wait(5)

    listing, listed = in_thread(lambda: client.get("/alibailian/api/v1/tasks", headers=bearer(key)))
    listing.join(5)
    answered = not listing.is_alive()
    upload.arrive.set()
    uploading.join(5)

    assert answered, "the listing waited for the submit's upload"
    assert listed[0].status_code == 200
    assert submitted[0].status_code == 200


def test_dashscope_routes_wait_for_a_place_and_health_does_not(one_at_a_time: Flask) -> None:
    app, key = one_at_a_time, new_key(one_at_a_time)
    client = app.test_client()
    turns = app.extensions["gateway"].turns
    turns.take()  # the worker's only place is taken

    assert client.get("/healthz").status_code == 200
    listing, listed = in_thread(lambda: client.get("/alibailian/api/v1/tasks", headers=bearer(key)))
    wait_until(lambda: turns.waiting == 1)
    turns.give_up()
    listing.join(5)

    assert listed[0].status_code == 200
    assert turns.waiting == 0


def test_two_places_a_worker_by_default_and_the_setting_is_checked(
    make_app: Callable[..., Flask],
) -> None:
    assert make_app().extensions["gateway"].turns.places == 2
    assert make_app(ONE_AT_A_TIME).extensions["gateway"].turns.places == 1
    with pytest.raises(ConfigError, match="requests_at_once"):
        make_app(BASE_CONFIG + "\n[server]\nrequests_at_once = -1\n")
