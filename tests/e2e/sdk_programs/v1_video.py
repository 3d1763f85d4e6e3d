"""Make videos with dashscope 1.x's VideoSynthesis through a DashScope-compatible base URL.

A DashScope user's program, written against the SDK's documented 1.x API and run by
tests/e2e/test_sdk_matrix.py with each SDK version in its own virtualenv. It uses what the
installed version has and prints one JSON object: every task it made (id, model, prompt,
status) and, under "absent", what this version lacks.

    python v1_video.py BASE_URL API_KEY IMAGE_PATH TAG MODELS_JSON
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

import dashscope
import requests
from dashscope import VideoSynthesis
from dashscope.common.utils import default_headers
from dashscope.utils.oss_utils import OssUtils
from dashscope.version import __version__

BASE_URL, API_KEY, IMAGE, TAG = sys.argv[1:5]
MODELS: dict[str, str] = json.loads(sys.argv[5])
REMOTE_IMAGE = "https://example.com/portrait.png"
REMOTE_AUDIO = "https://example.com/speech.mp3"
# Long enough that the cancel below finds the task still PENDING on a loaded machine.
HOLD = "[pending=30]"

dashscope.base_http_api_url = BASE_URL
results: dict[str, Any] = {"sdk_version": __version__, "tasks": {}, "absent": {}}


def record(step: str, response: Any, prompt: str, model: str) -> Any:
    """Remember one task the SDK answered about; fail loudly if it was an error."""
    if response.status_code != 200:
        raise SystemExit(f"{step}: {response.status_code} {response.code} {response.message}")
    results["tasks"][step] = {
        "task_id": response.output.task_id,
        "status": response.output.task_status,
        "model": model,
        "prompt": prompt,
    }
    return response


def upload(model: str, path: str) -> str:
    """Upload a local file with the SDK's own helper; return its oss:// URL."""
    uploaded = OssUtils.upload(model=model, file_path=path, api_key=API_KEY)
    # 1.21 returns the URL; later releases (url, upload_certificate).
    return uploaded[0] if isinstance(uploaded, tuple) else uploaded


# VideoSynthesis.call: submit and wait in one.
prompt = f"{TAG} call"
record(
    "call",
    VideoSynthesis.call(model=MODELS["t2v"], prompt=prompt, api_key=API_KEY),
    prompt,
    MODELS["t2v"],
)
results["call_video_url"] = VideoSynthesis.fetch(
    results["tasks"]["call"]["task_id"], api_key=API_KEY
).output.video_url

# async_call, fetch, wait.
prompt = f"{TAG} async_call"
submitted = VideoSynthesis.async_call(
    model=MODELS["t2v"], prompt=prompt, api_key=API_KEY, resolution="480P", duration=5
)
if submitted.status_code != 200:
    raise SystemExit(f"async_call: {submitted.status_code} {submitted.code} {submitted.message}")
results["async_call_status"] = submitted.output.task_status
results["fetch_status"] = VideoSynthesis.fetch(submitted, api_key=API_KEY).output.task_status
record("async_call", VideoSynthesis.wait(submitted, api_key=API_KEY), prompt, MODELS["t2v"])

# cancel a task that is still PENDING.
prompt = f"{TAG} cancel {HOLD}"
held = VideoSynthesis.async_call(model=MODELS["t2v"], prompt=prompt, api_key=API_KEY)
results["held_status"] = held.output.task_status
canceled = VideoSynthesis.cancel(held, api_key=API_KEY)
results["cancel_status_code"] = canceled.status_code
record("cancel", VideoSynthesis.fetch(held, api_key=API_KEY), prompt, MODELS["t2v"])

# A local file as file://, uploaded by the SDK before it submits.
prompt = f"{TAG} file image"
record(
    "file_image",
    VideoSynthesis.wait(
        VideoSynthesis.async_call(
            model=MODELS["i2v"], prompt=prompt, img_url=f"file://{IMAGE}", api_key=API_KEY
        ),
        api_key=API_KEY,
    ),
    prompt,
    MODELS["i2v"],
)

# An explicit upload, then a submit naming its oss:// URL.
prompt = f"{TAG} explicit upload"
results["uploaded_url"] = upload(MODELS["i2v"], IMAGE)
record(
    "explicit_upload",
    VideoSynthesis.wait(
        VideoSynthesis.async_call(
            model=MODELS["i2v"], prompt=prompt, img_url=results["uploaded_url"], api_key=API_KEY
        ),
        api_key=API_KEY,
    ),
    prompt,
    MODELS["i2v"],
)

# First and last frame: named parameters where the version has them, else extra_input with
# files uploaded for the kf2v model (extra_input is not uploaded by the SDK).
prompt = f"{TAG} first last frame"
if "first_frame_url" in inspect.signature(VideoSynthesis.async_call).parameters:
    results["first_last_frame_via"] = "first_frame_url"
    frames = VideoSynthesis.async_call(
        model=MODELS["kf2v"],
        prompt=prompt,
        first_frame_url=f"file://{IMAGE}",
        last_frame_url=f"file://{IMAGE}",
        api_key=API_KEY,
    )
else:
    results["first_last_frame_via"] = "extra_input"
    results["absent"]["first_frame_url"] = "VideoSynthesis.async_call has no first_frame_url"
    frames = VideoSynthesis.async_call(
        model=MODELS["kf2v"],
        prompt=prompt,
        extra_input={
            "first_frame_url": upload(MODELS["kf2v"], IMAGE),
            "last_frame_url": upload(MODELS["kf2v"], IMAGE),
        },
        api_key=API_KEY,
    )
record("first_last_frame", VideoSynthesis.wait(frames, api_key=API_KEY), prompt, MODELS["kf2v"])

# An image2video model after its synchronous image check. No SDK class sends the check, so it
# goes as DashScope's HTTP documentation shows, with the SDK's own headers.
check = requests.post(
    f"{BASE_URL}/services/aigc/image2video/face-detect",
    json={"model": MODELS["s2v_detect"], "input": {"image_url": REMOTE_IMAGE}},
    headers={**default_headers(API_KEY), "Content-Type": "application/json"},
    timeout=30,
)
results["check"] = {"status_code": check.status_code, "body": check.json()}
results["absent"]["face_detect"] = "no SDK class sends image2video/face-detect"
prompt = f"{TAG} image2video"
record(
    "image2video",
    VideoSynthesis.wait(
        VideoSynthesis.async_call(
            model=MODELS["s2v"],
            prompt=prompt,
            task="image2video",
            extra_input={"image_url": REMOTE_IMAGE, "audio_url": REMOTE_AUDIO},
            resolution="480P",
            api_key=API_KEY,
        ),
        api_key=API_KEY,
    ),
    prompt,
    MODELS["s2v"],
)

# list: the account's tasks, as 1.x returns them.
listed = VideoSynthesis.list(page_size=100, api_key=API_KEY)
results["list_status_code"] = listed.status_code
results["listed_task_ids"] = [task["task_id"] for task in (listed.output or {}).get("data", [])]

# AioVideoSynthesis, where the version has it.
try:
    from dashscope.aigc.video_synthesis import AioVideoSynthesis
except ImportError:
    AioVideoSynthesis = None
    results["absent"]["AioVideoSynthesis"] = (
        "dashscope.aigc.video_synthesis has no AioVideoSynthesis"
    )


async def aio(prompt: str) -> Any:
    """Submit, fetch and wait with asyncio."""
    submitted = await AioVideoSynthesis.async_call(
        model=MODELS["i2v"], prompt=prompt, img_url=f"file://{IMAGE}", api_key=API_KEY
    )
    if submitted.status_code != 200:
        raise SystemExit(f"aio: {submitted.status_code} {submitted.code} {submitted.message}")
    results["aio_fetch_status"] = (
        await AioVideoSynthesis.fetch(submitted, api_key=API_KEY)
    ).output.task_status
    return await AioVideoSynthesis.wait(submitted, api_key=API_KEY)


if AioVideoSynthesis is not None:
    prompt = f"{TAG} aio"
    record("aio", asyncio.run(aio(prompt)), prompt, MODELS["i2v"])

print(json.dumps(results))
