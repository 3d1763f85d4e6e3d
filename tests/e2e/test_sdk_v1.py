"""The official SDK's 1.x API (`dashscope.VideoSynthesis`) against the real gateway."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dashscope
import pytest
import requests
from dashscope import VideoSynthesis

from .conftest import (
    API_PREFIX,
    KF2V,
    SIM_KEY,
    T2V,
    UPSTREAM_KF2V_SUBMIT_PATH,
    UPSTREAM_SUBMIT_PATH,
    Gateway,
    Keys,
    Simulator,
)

# VideoSynthesis.wait() has no deadline of its own; a task takes about 1 s here.
pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Sent:
    """One HTTP request the SDK put on the wire."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


@pytest.fixture
def sdk(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Point SDK 1.x at the gateway; return the list of requests it sends there.

    The recorder wraps requests.Session.send and calls through: it observes the SDK's real
    traffic so tests can compare it with what reached upstream, and changes nothing.
    """
    monkeypatch.setattr(dashscope, "base_http_api_url", gateway.api)
    sent: list[Sent] = []
    real_send = requests.Session.send

    def recording_send(self: requests.Session, request: Any, **kwargs: Any) -> Any:
        if request.url.startswith(gateway.api):
            body = request.body.encode() if isinstance(request.body, str) else request.body
            sent.append(Sent(request.method, request.url, dict(request.headers), body))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", recording_send)
    return sent


def only_submit(sent: list[Sent]) -> Sent:
    """Return the one submit among the recorded requests."""
    submits = [s for s in sent if s.method == "POST"]
    assert len(submits) == 1, submits
    return submits[0]


def test_async_call_fetch_wait_succeeds(
    sdk: list[Sent], gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    submitted = VideoSynthesis.async_call(
        model=T2V,
        prompt="a red fox running through snow",
        negative_prompt="blurry",
        api_key=keys.alice,
        resolution="480P",
        duration=5,
        seed=42,
        extra_input={"e2e_extra_input": {"kept": [1, 2, 3]}},
        e2e_extra_parameter="kept too",
    )
    assert submitted.status_code == 200, submitted
    task_id = submitted.output.task_id
    assert task_id
    assert submitted.output.task_status == "PENDING"

    # Forwarded unchanged: what upstream got is exactly what the SDK sent the gateway.
    sent = only_submit(sdk)
    assert sent.url == f"{gateway.api}/services/aigc/video-generation/video-synthesis"
    sent_body = json.loads(sent.body or b"")
    assert sent_body["input"]["extend_prompt"] is True  # the SDK always adds it
    assert sent_body["input"]["e2e_extra_input"] == {"kept": [1, 2, 3]}
    assert sent_body["parameters"]["e2e_extra_parameter"] == "kept too"
    upstream = simulator.last_submit()
    assert upstream["path"] == UPSTREAM_SUBMIT_PATH
    assert upstream["body"] == sent_body
    # The channel's key upstream, never the client's, and the async header.
    assert sent.headers["Authorization"] == f"Bearer {keys.alice}"
    assert upstream["headers"]["authorization"] == f"Bearer {SIM_KEY}"
    assert upstream["headers"]["x-dashscope-async"] == "enable"
    assert keys.alice not in json.dumps(upstream["headers"])

    fetched = VideoSynthesis.fetch(submitted, api_key=keys.alice)
    assert fetched.status_code == 200, fetched
    assert fetched.output.task_id == task_id
    assert fetched.output.task_status in {"PENDING", "RUNNING", "SUCCEEDED"}

    done = VideoSynthesis.wait(submitted, api_key=keys.alice)
    assert done.status_code == 200, done
    assert done.output.task_id == task_id
    assert done.output.task_status == "SUCCEEDED"
    assert done.output.video_url.startswith("http")
    assert task_id in done.output.video_url
    assert done.usage.video_count == 1
    # Every call went to the gateway's alias, with the gateway key.
    assert all(s.url.startswith(gateway.url + API_PREFIX) for s in sdk)
    assert all(s.headers["Authorization"] == f"Bearer {keys.alice}" for s in sdk)


def test_kf2v_model_goes_to_the_image2video_route(
    sdk: list[Sent], gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    submitted = VideoSynthesis.async_call(
        model=KF2V,
        prompt="a flower opening",
        first_frame_url="https://example.com/first.png",
        last_frame_url="https://example.com/last.png",
        api_key=keys.alice,
    )
    assert submitted.status_code == 200, submitted
    sent = only_submit(sdk)
    assert sent.url == f"{gateway.api}/services/aigc/image2video/video-synthesis"
    upstream = simulator.last_submit()
    assert upstream["path"] == UPSTREAM_KF2V_SUBMIT_PATH
    assert upstream["body"] == json.loads(sent.body or b"")
    assert upstream["body"]["input"]["first_frame_url"] == "https://example.com/first.png"
    assert upstream["headers"]["authorization"] == f"Bearer {SIM_KEY}"
    assert upstream["headers"]["x-dashscope-async"] == "enable"

    done = VideoSynthesis.wait(submitted, api_key=keys.alice)
    assert done.status_code == 200, done
    assert done.output.task_status == "SUCCEEDED"
    assert done.output.video_url


def test_failed_task_reports_code_in_output(sdk: list[Sent], keys: Keys) -> None:
    submitted = VideoSynthesis.async_call(
        model=T2V, prompt="[fail] a doomed video", api_key=keys.alice
    )
    assert submitted.status_code == 200, submitted

    done = VideoSynthesis.wait(submitted, api_key=keys.alice)
    assert done.status_code == 200, done
    assert done.output.task_status == "FAILED"
    assert done.output.code == "InternalError.Algo"
    assert done.output.message
    assert not done.output.video_url


def test_second_key_of_the_account_can_wait(sdk: list[Sent], keys: Keys) -> None:
    submitted = VideoSynthesis.async_call(model=T2V, prompt="rotated key", api_key=keys.alice)
    assert submitted.status_code == 200, submitted

    done = VideoSynthesis.wait(submitted.output.task_id, api_key=keys.alice_second)
    assert done.status_code == 200, done
    assert done.output.task_status == "SUCCEEDED"


def test_sdk_sees_native_errors(sdk: list[Sent], keys: Keys) -> None:
    bad_key = VideoSynthesis.async_call(model=T2V, prompt="x", api_key="sk-not-a-gateway-key")
    assert bad_key.status_code == 401
    assert bad_key.code == "InvalidApiKey"
    assert bad_key.message == "Invalid API-key provided."

    unknown = VideoSynthesis.async_call(model="wan-e2e-nope", prompt="x", api_key=keys.alice)
    assert unknown.status_code == 400
    assert unknown.code == "model_not_found"

    foreign = VideoSynthesis.async_call(model=T2V, prompt="mine", api_key=keys.alice)
    assert foreign.status_code == 200, foreign
    hidden = VideoSynthesis.fetch(foreign.output.task_id, api_key=keys.bob)
    assert hidden.status_code == 400
    assert hidden.code == "task_not_exist"
    assert hidden.message == "task_not_exist"
