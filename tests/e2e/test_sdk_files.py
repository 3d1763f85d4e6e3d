"""The official SDK's own local-file, asyncio and list paths, end to end through the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dashscope
import pytest
from dashscope import VideoSynthesis
from dashscope.aigc.video_synthesis import AioVideoSynthesis
from dashscope.v2 import Client

from .conftest import I2V, KF2V, Gateway, Keys, Simulator

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """Return a local image file, as DashScope's samples pass them."""
    path = tmp_path / "frame.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n simulated")
    return path


@pytest.fixture
def sdk_base(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point SDK 1.x at the gateway."""
    monkeypatch.setattr(dashscope, "base_http_api_url", gateway.api)
    return gateway.api


def test_1x_file_images_are_uploaded_and_resolved(
    sdk_base: str, keys: Keys, simulator: Simulator, image: Path
) -> None:
    uploads = simulator.stats()["uploads"]
    done = VideoSynthesis.call(
        model=I2V, prompt="a local frame", img_url=f"file://{image}", api_key=keys.alice
    )
    assert done.status_code == 200, done
    assert done.output.task_status == "SUCCEEDED"
    last = simulator.last_submit()
    assert last["body"]["input"]["img_url"].startswith("oss://")
    assert last["headers"]["x-dashscope-ossresourceresolve"] == "enable"
    assert simulator.stats()["uploads"] == uploads + 1


def test_1x_first_and_last_frame_files(
    sdk_base: str, keys: Keys, simulator: Simulator, image: Path
) -> None:
    submitted = VideoSynthesis.async_call(
        model=KF2V,
        prompt="a flower opening",
        first_frame_url=f"file://{image}",
        last_frame_url=str(image),
        api_key=keys.alice,
    )
    assert submitted.status_code == 200, submitted
    body = simulator.last_submit()["body"]["input"]
    assert body["first_frame_url"].startswith("oss://")
    assert body["last_frame_url"].startswith("oss://")
    assert VideoSynthesis.wait(submitted, api_key=keys.alice).output.task_status == "SUCCEEDED"


def test_another_accounts_upload_is_refused(
    sdk_base: str, keys: Keys, simulator: Simulator, image: Path
) -> None:
    submitted = VideoSynthesis.async_call(
        model=I2V, prompt="mine", img_url=f"file://{image}", api_key=keys.alice
    )
    assert submitted.status_code == 200, submitted
    url = simulator.last_submit()["body"]["input"]["img_url"]
    stolen = VideoSynthesis.async_call(model=I2V, prompt="theirs", img_url=url, api_key=keys.bob)
    assert (stolen.status_code, stolen.code) == (400, "InvalidParameter")
    assert "img_url" in stolen.message


def test_aio_video_synthesis_polls_with_a_trailing_slash(sdk_base: str, keys: Keys) -> None:
    async def run() -> str:
        submitted = await AioVideoSynthesis.async_call(
            model=I2V, prompt="asyncio", img_url="https://example.com/a.png", api_key=keys.alice
        )
        assert submitted.status_code == 200, submitted
        fetched = await AioVideoSynthesis.fetch(submitted, api_key=keys.alice)
        assert fetched.status_code == 200, fetched
        done = await AioVideoSynthesis.wait(submitted, api_key=keys.alice)
        return str(done.output.task_status)

    assert asyncio.run(run()) == "SUCCEEDED"


def test_2x_file_image_and_list(gateway: Gateway, keys: Keys, image: Path) -> None:
    with Client(api_key=keys.alice, base_url=gateway.api) as client:
        job = client.videos.jobs.create(model=I2V, prompt="v2 file", image_url=f"file://{image}")
        done = client.videos.jobs.wait(job, poll_interval=0.2, max_interval=0.5, timeout=30)
        assert done.status == "SUCCEEDED"
        page = client.videos.jobs.list(page_size=100)
    assert page.total >= 1
    assert job.task_id in {task.task_id for task in page.tasks}
    listed = next(task for task in page.tasks if task.task_id == job.task_id)
    assert listed.status == "SUCCEEDED"
    assert listed.submitted_at
