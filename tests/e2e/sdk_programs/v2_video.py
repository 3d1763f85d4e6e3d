"""Make videos with dashscope 2.x's Client and AsyncClient through a DashScope-compatible URL.

A DashScope user's program, written against the SDK's documented 2.x API and run by
tests/e2e/test_sdk_matrix.py with each SDK version in its own virtualenv. It prints one JSON
object: every task it made (id, model, prompt, status), what `list` returned and, under
"absent", what this version lacks (1.x releases have no `dashscope.Client`).

    python v2_video.py BASE_URL API_KEY IMAGE_PATH TAG MODELS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dashscope.version import __version__

BASE_URL, API_KEY, IMAGE, TAG = sys.argv[1:5]
MODELS: dict[str, str] = json.loads(sys.argv[5])
# Long enough that the cancel below finds the task still PENDING on a loaded machine.
HOLD = "[pending=30]"
# The simulator finishes a task in about a second: poll faster than the 1 s default.
POLL = {"poll_interval": 0.2, "max_interval": 0.5, "timeout": 60}

results: dict[str, Any] = {"sdk_version": __version__, "tasks": {}, "absent": {}}
try:
    from dashscope import AsyncClient, Client
except ImportError:
    results["absent"]["Client"] = "dashscope has no Client or AsyncClient (a 1.x release)"
    print(json.dumps(results))
    sys.exit(0)


def record(step: str, job: Any, prompt: str, model: str) -> None:
    """Remember one task as the SDK last described it."""
    results["tasks"][step] = {
        "task_id": job.task_id,
        "status": job.status,
        "model": model,
        "prompt": prompt,
    }


with Client(api_key=API_KEY, base_url=BASE_URL) as client:
    jobs = client.videos.jobs

    prompt = f"{TAG} create"
    job = jobs.create(model=MODELS["t2v"], prompt=prompt, resolution="480P", duration=5)
    results["created_status"] = job.status
    record("create", jobs.wait(job, **POLL), prompt, MODELS["t2v"])

    prompt = f"{TAG} file image"
    job = jobs.create(model=MODELS["i2v"], prompt=prompt, image_url=f"file://{IMAGE}")
    record("file_image", jobs.wait(job, **POLL), prompt, MODELS["i2v"])

    # First and last frame: 2.x has no named parameters for them; extra_input's local files
    # are uploaded like image_url.
    prompt = f"{TAG} first last frame"
    job = jobs.create(
        model=MODELS["kf2v"],
        prompt=prompt,
        extra_input={"first_frame_url": f"file://{IMAGE}", "last_frame_url": f"file://{IMAGE}"},
    )
    record("first_last_frame", jobs.wait(job, **POLL), prompt, MODELS["kf2v"])

    prompt = f"{TAG} cancel {HOLD}"
    held = jobs.create(model=MODELS["t2v"], prompt=prompt)
    results["held_status"] = held.status
    jobs.cancel(held.task_id)
    record("cancel", jobs.fetch(held.task_id), prompt, MODELS["t2v"])

    page = jobs.list(page_size=100)
    results["list_total"] = page.total
    results["listed"] = {task.task_id: task.status for task in page.tasks}


async def run_async() -> None:
    """Create, wait and list with AsyncClient."""
    async with AsyncClient(api_key=API_KEY, base_url=BASE_URL) as client:
        prompt = f"{TAG} async create"
        job = await client.videos.jobs.create(
            model=MODELS["i2v"], prompt=prompt, image_url=f"file://{IMAGE}"
        )
        record("async_create", await client.videos.jobs.wait(job, **POLL), prompt, MODELS["i2v"])
        page = await client.videos.jobs.list(page_size=100)
        results["async_listed"] = {task.task_id: task.status for task in page.tasks}


asyncio.run(run_async())
print(json.dumps(results))
