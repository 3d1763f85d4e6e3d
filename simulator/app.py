"""A DashScope async video API simulator that speaks the upstream wire protocol."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

DEFAULTS: dict[str, Any] = {
    "keys": None,
    "pending_seconds": 0.5,
    "running_seconds": 1.0,
    "latency_ms": 0,
    "answer_after_seconds": 0,
}

SUBMIT_PATHS = (
    "/api/v1/services/aigc/video-generation/video-synthesis",
    "/api/v1/services/aigc/image2video/video-synthesis",
    "/api/v1/services/aigc/image2video/aa-template-generation",
)
# Synchronous checks, and what each answers about an image that passes.
CHECK_PATHS = {
    "/api/v1/services/aigc/image2video/face-detect": {
        "check_pass": True,
        "humanoid": True,
        "face_bbox": [302, 286, 610, 593],
        "ext_bbox": [71, 9, 840, 778],
    },
    "/api/v1/services/aigc/image2video/aa-detect": {"check_pass": True, "bodystyle": "full"},
}
CHECK_REFUSED = "The image does not pass the check."

SECONDS = r"(\d+(?:\.\d*)?|\.\d+)"
SLEEP_MARKER = re.compile(rf"\[sleep={SECONDS}\]")
ANSWER_AFTER_MARKER = re.compile(rf"\[answer-after={SECONDS}\]")
# The seconds of video the SUCCEEDED answer's usage reports (fractional ones, as s2v's are).
DURATION_MARKER = re.compile(rf"\[duration={SECONDS}\]")
# How long this one task stays PENDING (instead of --pending-seconds), so that a client has
# time to cancel it however slow the machine is.
PENDING_MARKER = re.compile(rf"\[pending={SECONDS}\]")
# How long this one task runs (instead of --running-seconds), its queries answering UNKNOWN
# meanwhile, as DashScope does for a task it cannot find for a while.
UNKNOWN_MARKER = re.compile(rf"\[unknown={SECONDS}\]")
SIZE = re.compile(r"\s*(\d+)\s*\*\s*(\d+)\s*")

# The task list's filters, as DashScope's console takes them: Beijing time, at most a day.
LIST_STATUSES = ("PENDING", "RUNNING", "SUSPENDED", "SUCCEEDED", "FAILED", "CANCELED")
LIST_TIME = re.compile(r"\d{14}")
BEIJING = timezone(timedelta(hours=8))
MAX_LIST_WINDOW = 24 * 3600
MAX_PAGE_SIZE = 100
REGION = "cn-beijing"

# Codes for errors Flask raises itself (routing, body parsing), in DashScope's vocabulary.
HTTP_CODES = {
    400: "InvalidParameter",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeOut",
    413: "BadRequest.TooLarge",
    500: "InternalError",
}

# The OSS bucket this simulator plays, and the secret it signs upload policies with.
OSS_PATH = "/_oss/upload"
POLICY_SECRET = b"simulated-oss-secret"
POLICY_SECONDS = 300

FAILED_MESSAGE = "The algorithm failed to generate the video, please try again later."


@dataclass
class Task:
    """One submitted task; its status is derived from the clock, not stored."""

    task_id: str
    owner: str
    model: str
    prompt: str
    body: dict[str, Any]
    created: float
    request_id: str
    fail: bool = False
    canceled_at: float | None = None
    pending: float | None = None  # seconds PENDING, when a [pending=S] marker set them
    unknown: float | None = None  # seconds running and queried as UNKNOWN ([unknown=S])
    path: str = ""  # the service path it was submitted on


@dataclass
class State:
    """Everything the simulator remembers, shared across request threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, Task] = field(default_factory=dict)
    requests_total: int = 0
    submits: int = 0
    queries: int = 0
    cancels: int = 0
    lists: int = 0
    checks: int = 0
    last_check: dict[str, Any] | None = None
    # getPolicy's upload directories and the objects uploaded under them: (key, model) each.
    policies: dict[str, tuple[str, str]] = field(default_factory=dict)
    objects: dict[str, tuple[str, str]] = field(default_factory=dict)
    uploads: int = 0
    queries_by_task: Counter[str] = field(default_factory=Counter)
    submits_by_prompt: Counter[str] = field(default_factory=Counter)
    last_submit: dict[str, Any] | None = None

    def reset(self) -> None:
        """Forget every task and counter."""
        with self.lock:
            self.tasks.clear()
            self.requests_total = self.submits = self.queries = self.cancels = self.lists = 0
            self.checks = self.uploads = 0
            self.last_check = None
            self.policies.clear()
            self.objects.clear()
            self.queries_by_task.clear()
            self.submits_by_prompt.clear()
            self.last_submit = None


def format_time(ts: float) -> str:
    """Format an epoch timestamp the way DashScope does: YYYY-MM-DD HH:MM:SS.mmm."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def new_id() -> str:
    """Return a fresh request or task id."""
    return str(uuid.uuid4())


def error(status: int, code: str, message: str) -> tuple[Response, int]:
    """Build a DashScope-shaped error answer."""
    return jsonify(request_id=new_id(), code=code, message=message), status


def api_key_id(key: str) -> str:
    """Return a stable numeric id for a key, standing in for the console's API key id."""
    return str(zlib.crc32(key.encode()))


def epoch_ms(ts: float) -> int:
    """Turn an epoch timestamp into the epoch milliseconds of the task list."""
    return int(ts * 1000)


class ListParameterError(ValueError):
    """A task-list query parameter DashScope would refuse with 400 InvalidParameter."""


def parse_list_time(name: str, value: str) -> float:
    """Parse a task-list time filter (YYYYMMDDhhmmss, Beijing time) into an epoch timestamp."""
    try:
        if not LIST_TIME.fullmatch(value):
            raise ValueError(value)
        moment = datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=BEIJING)
    except ValueError:
        raise ListParameterError(f"{name} must be a time formatted YYYYMMDDhhmmss.") from None
    return moment.timestamp()


def parse_list_int(name: str, value: str | None, default: int, maximum: int) -> int:
    """Parse a positive paging parameter no larger than maximum."""
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= maximum:
        raise ListParameterError(f"{name} must be an integer from 1 to {maximum}.")
    return int(value)


def resolution_sr(parameters: dict[str, Any]) -> int:
    """Return the usage SR of a submit: its resolution ("720P"), else its size's shorter side."""
    value = str(parameters.get("resolution") or "").strip().upper().removesuffix("P")
    if value.isdigit():
        return int(value)
    size = SIZE.fullmatch(str(parameters.get("size") or ""))
    if size is not None:
        side = min(int(size.group(1)), int(size.group(2)))
        # DashScope's tiers; a square or odd size reports the tier nearest in pixels.
        if side in (480, 720, 1080):
            return side
        pixels = int(size.group(1)) * int(size.group(2))
        return min((480, 720, 1080), key=lambda sr: abs(sr * sr * 16 // 9 - pixels))
    return 480


def usage_duration(prompt: str, parameters: dict[str, Any]) -> int | float:
    """Return the seconds the usage reports: a [duration=S] marker, else as submitted, else 5."""
    if match := DURATION_MARKER.search(prompt):
        seconds = float(match.group(1))
        return int(seconds) if seconds.is_integer() else seconds
    duration = parameters.get("duration")
    return duration if isinstance(duration, int | float) and not isinstance(duration, bool) else 5


def sign(policy: str) -> str:
    """Return the simulated OSS signature of a policy document."""
    digest = hmac.new(POLICY_SECRET, policy.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def oss_inputs(value: Any) -> list[str]:
    """Return every `oss://` string anywhere in a value."""
    if isinstance(value, str):
        return [value] if value.startswith("oss://") else []
    if isinstance(value, dict):
        return [url for item in value.values() for url in oss_inputs(item)]
    if isinstance(value, list):
        return [url for item in value for url in oss_inputs(item)]
    return []


def create_simulator(config: dict[str, Any] | None = None) -> Flask:
    """Build a Flask app that simulates DashScope's async video API."""
    cfg = {**DEFAULTS, **(config or {})}
    accepted = set(cfg["keys"] or [])
    pending = float(cfg["pending_seconds"])
    running = float(cfg["running_seconds"])
    latency = float(cfg["latency_ms"]) / 1000.0
    answer_after = float(cfg["answer_after_seconds"])
    state = State()

    app = Flask(__name__)
    # DashScope answers the same with and without a trailing slash.
    app.url_map.strict_slashes = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["simulator"] = state

    def authenticate() -> str | tuple[Response, int]:
        """Return the caller's key, or the 401 answer DashScope would give."""
        header = request.headers.get("Authorization", "").strip()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or (scheme.lower() == "bearer" and not token):
            return error(401, "InvalidApiKey", "No API-key provided.")
        if scheme.lower() != "bearer" or (accepted and token not in accepted):
            return error(401, "InvalidApiKey", "Invalid API-key provided.")
        return token

    def visible_task(task_id: str, key: str) -> Task | None:
        """Return the task if it exists and belongs to this key, as DashScope scopes them."""
        with state.lock:
            task = state.tasks.get(task_id)
        return task if task is not None and task.owner == key else None

    def end_of(task: Task, now: float) -> float | None:
        """Return when a task finished or was canceled, None while it is unfinished."""
        if task.canceled_at is not None:
            return task.canceled_at
        finished = task.created + pending_of(task) + running_of(task)
        return finished if finished <= now else None

    def pending_of(task: Task) -> float:
        """Return how long the task stays PENDING: its marker's seconds, else the default."""
        return pending if task.pending is None else task.pending

    def running_of(task: Task) -> float:
        """Return how long the task runs: its [unknown=S] marker's seconds, else the default."""
        return running if task.unknown is None else task.unknown

    def status_of(task: Task, now: float) -> str:
        """Derive a task's status from how long ago it was submitted."""
        if task.canceled_at is not None:
            return "CANCELED"
        elapsed = now - task.created
        if elapsed < pending_of(task):
            return "PENDING"
        if elapsed < pending_of(task) + running_of(task):
            return "RUNNING"
        return "FAILED" if task.fail else "SUCCEEDED"

    def unresolved(body: dict[str, Any], key: str) -> tuple[Response, int] | None:
        """Return DashScope's error if an `oss://` input cannot be resolved for this key."""
        urls = oss_inputs(body.get("input"))
        if not urls:
            return None
        if request.headers.get("X-DashScope-OssResourceResolve", "").lower() != "enable":
            return error(400, "InvalidParameter", "The oss:// URL needs OssResourceResolve.")
        for url in urls:
            with state.lock:
                found = state.objects.get(url.removeprefix("oss://"))
            # A file belongs to the account and the model its policy was for.
            if found != (key, str(body.get("model"))):
                return error(400, "InvalidParameter", f"The file {url} cannot be resolved.")
        return None

    @app.get("/api/v1/uploads")
    def get_policy() -> Any:
        """Hand out an upload policy for a model, to this simulator's own OSS host."""
        key = authenticate()
        if not isinstance(key, str):
            return key
        model = request.args.get("model")
        if request.args.get("action") != "getPolicy" or not model:
            return error(400, "InvalidParameter", "action=getPolicy and model are required.")
        upload_dir = f"dashscope-instant/{api_key_id(key)}/{time.strftime('%Y-%m-%d')}/{new_id()}"
        expires = datetime.now(UTC) + timedelta(seconds=POLICY_SECONDS)
        document = {
            "expiration": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "conditions": [["starts-with", "$key", upload_dir]],
        }
        policy = base64.b64encode(json.dumps(document).encode()).decode()
        with state.lock:
            state.policies[upload_dir] = (key, model)
        return jsonify(
            request_id=new_id(),
            data={
                "policy": policy,
                "signature": sign(policy),
                "upload_dir": upload_dir,
                "upload_host": request.host_url.rstrip("/") + OSS_PATH,
                "expire_in_seconds": POLICY_SECONDS,
                "max_file_size_mb": 100,
                "capacity_limit_mb": 999999999,
                "oss_access_key_id": "LTAI-simulated",
                "x_oss_object_acl": "private",
                "x_oss_forbid_overwrite": "true",
            },
        )

    @app.post(OSS_PATH)
    def oss_upload() -> Any:
        """Take a multipart POST upload as OSS does, checking the policy and its signature."""
        form = request.form
        policy, key = form.get("policy", ""), form.get("key", "")
        upload = request.files.get("file")
        if not hmac.compare_digest(form.get("Signature", ""), sign(policy)):
            return Response("SignatureDoesNotMatch", status=403, mimetype="application/xml")
        document = json.loads(base64.b64decode(policy))
        prefix = document["conditions"][0][2]
        with state.lock:
            owner = state.policies.get(prefix)
        if owner is None or not key.startswith(prefix + "/") or upload is None:
            return Response("AccessDenied", status=403, mimetype="application/xml")
        if form.get("OSSAccessKeyId") != "LTAI-simulated":
            return Response("InvalidAccessKeyId", status=403, mimetype="application/xml")
        upload.read()
        with state.lock:
            state.objects[key] = owner
            state.uploads += 1
        return Response(status=int(form.get("success_action_status") or 204))

    @app.before_request
    def count_and_delay() -> None:
        # Latency applies to every upstream call so benchmarks see a realistic round trip.
        if not request.path.startswith("/api/v1/"):
            return
        with state.lock:
            state.requests_total += 1
        if latency > 0:
            time.sleep(latency)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        # Clients (the SDK included) only read code/message from JSON bodies, never HTML.
        status = exc.code or 500
        code = HTTP_CODES.get(status, (exc.name or "Error").replace(" ", ""))
        return error(status, code, exc.description or exc.name or "")

    def check() -> Any:
        """Answer a synchronous image check at once; `[reject]` in a URL fails it."""
        body = request.get_json(force=True, silent=True)
        with state.lock:
            state.checks += 1
            state.last_check = {
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
                "path": request.path,
            }
        key = authenticate()
        if not isinstance(key, str):
            return key
        if request.headers.get("X-DashScope-Async", "").strip().lower() == "enable":
            return error(
                403, "AccessDenied", "current user api does not support asynchronous calls"
            )
        if not isinstance(body, dict) or not body.get("model"):
            return error(400, "BadRequest.EmptyModel", 'Required parameter "model" missing.')
        if not isinstance(body.get("input"), dict):
            return error(400, "BadRequest.EmptyInput", 'Required parameter "input" missing.')
        if (refused := unresolved(body, key)) is not None:
            return refused
        output: dict[str, Any] = dict(CHECK_PATHS[request.path.rstrip("/")])
        if "[reject]" in str(body["input"]):
            output = {"check_pass": False, "code": "InvalidFile.Content", "message": CHECK_REFUSED}
        return jsonify(request_id=new_id(), output=output, usage={"image_count": 1})

    for check_path in CHECK_PATHS:
        app.add_url_rule(check_path, f"check {check_path}", check, methods=["POST"])

    @app.post(SUBMIT_PATHS[0])
    @app.post(SUBMIT_PATHS[1])
    @app.post(SUBMIT_PATHS[2])
    def submit() -> Any:
        """Accept an async video task."""
        body = request.get_json(force=True, silent=True)
        with state.lock:
            state.submits += 1
            state.last_submit = {
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
                "path": request.path,
            }

        key = authenticate()
        if not isinstance(key, str):
            return key
        if request.headers.get("X-DashScope-Async", "").strip().lower() != "enable":
            return error(403, "AccessDenied", "current user api does not support synchronous calls")
        if not isinstance(body, dict):
            return error(400, "InvalidParameter", "The request body must be a JSON object.")
        if not body.get("model"):
            return error(400, "BadRequest.EmptyModel", 'Required parameter "model" missing.')
        if "input" not in body or body["input"] is None:
            return error(400, "BadRequest.EmptyInput", 'Required parameter "input" missing.')
        if not isinstance(body["input"], dict):
            return error(400, "InvalidParameter", 'Parameter "input" must be an object.')
        if (refused := unresolved(body, key)) is not None:
            return refused

        prompt = body["input"].get("prompt")
        prompt = prompt if isinstance(prompt, str) else ""
        if match := SLEEP_MARKER.search(prompt):
            time.sleep(float(match.group(1)))
        if "[moderate]" in prompt:
            return error(
                400, "DataInspectionFailed", "Input data may contain inappropriate content."
            )
        if "[throttle]" in prompt:
            return error(
                429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."
            )
        if "[error500]" in prompt:
            return error(500, "InternalError", "An internal error has occured, please try again.")

        task = Task(
            task_id=new_id(),
            owner=key,
            model=str(body["model"]),
            prompt=prompt,
            body=body,
            created=time.time(),
            request_id=new_id(),
            fail="[fail]" in prompt,
            pending=float(marker.group(1)) if (marker := PENDING_MARKER.search(prompt)) else None,
            unknown=float(marker.group(1)) if (marker := UNKNOWN_MARKER.search(prompt)) else None,
            path=request.path,
        )
        with state.lock:
            state.tasks[task.task_id] = task
            state.submits_by_prompt[prompt] += 1
        # Sleeping after the task is stored models an answer lost in transit: the task exists
        # upstream (and bills) although the client may never learn its id.
        match = ANSWER_AFTER_MARKER.search(prompt)
        delay = float(match.group(1)) if match else answer_after
        if delay > 0:
            time.sleep(delay)
        return jsonify(
            request_id=task.request_id,
            output={"task_id": task.task_id, "task_status": "PENDING"},
        )

    @app.get("/api/v1/tasks")
    def list_tasks() -> Any:
        """List the calling key's tasks, newest first, in DashScope's flat task-list body."""
        with state.lock:
            state.lists += 1
        key = authenticate()
        if not isinstance(key, str):
            return key
        args = request.args
        try:
            page_no = parse_list_int("page_no", args.get("page_no"), 1, 2**31 - 1)
            page_size = parse_list_int("page_size", args.get("page_size"), 10, MAX_PAGE_SIZE)
            start = args.get("start_time")
            end = args.get("end_time")
            start_ts = parse_list_time("start_time", start) if start is not None else None
            end_ts = parse_list_time("end_time", end) if end is not None else None
            if start_ts is not None and end_ts is not None:
                if end_ts < start_ts:
                    raise ListParameterError("end_time must not be before start_time.")
                if end_ts - start_ts > MAX_LIST_WINDOW:
                    raise ListParameterError(
                        "The time range between start_time and end_time must not exceed 24 hours."
                    )
            status = args.get("status")
            if status is not None and status not in LIST_STATUSES:
                raise ListParameterError(f"status must be one of {', '.join(LIST_STATUSES)}.")
        except ListParameterError as exc:
            return error(400, "InvalidParameter", str(exc))
        model_name = args.get("model_name")
        key_id = args.get("api_key_id")
        region = args.get("region")

        now = time.time()
        with state.lock:
            owned = [task for task in state.tasks.values() if task.owner == key]
        matching = []
        for task in owned:
            task_status = status_of(task, now)
            if (
                (status is None or task_status == status)
                and (start_ts is None or task.created >= start_ts)
                # end_time covers its whole second: the filter's resolution is one second.
                and (end_ts is None or task.created < end_ts + 1)
                and (model_name is None or task.model == model_name)
                and (key_id is None or key_id == api_key_id(task.owner))
                and (region is None or region == REGION)
            ):
                matching.append((task, task_status))
        matching.sort(key=lambda pair: pair[0].created, reverse=True)
        first = (page_no - 1) * page_size
        data = []
        for task, task_status in matching[first : first + page_size]:
            ended = end_of(task, now)
            data.append(
                {
                    "task_id": task.task_id,
                    "status": task_status,
                    "model_name": task.model,
                    "gmt_create": epoch_ms(task.created),
                    "end_time": epoch_ms(ended) if ended is not None else None,
                    "api_key_id": api_key_id(task.owner),
                    "request_id": task.request_id,
                    "region": REGION,
                }
            )
        return jsonify(
            request_id=new_id(),
            total=len(matching),
            total_page=math.ceil(len(matching) / page_size),
            page_no=page_no,
            page_size=page_size,
            data=data,
        )

    @app.get("/api/v1/tasks/<task_id>")
    def query(task_id: str) -> Any:
        """Report a task's current state."""
        with state.lock:
            state.queries += 1
            state.queries_by_task[task_id] += 1
        key = authenticate()
        if not isinstance(key, str):
            return key
        task = visible_task(task_id, key)
        now = time.time()
        status = status_of(task, now) if task is not None else "UNKNOWN"
        if task is None or (status == "RUNNING" and task.unknown is not None):
            # DashScope hides foreign and expired tasks behind UNKNOWN with HTTP 200 (and an
            # [unknown=S] task while it runs).
            return jsonify(
                request_id=new_id(), output={"task_id": task_id, "task_status": "UNKNOWN"}
            )

        scheduled = task.created + pending_of(task)
        finished = scheduled + running_of(task)
        output: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": status,
            "submit_time": format_time(task.created),
        }
        answer: dict[str, Any] = {"request_id": new_id(), "output": output}
        if status == "CANCELED":
            output["end_time"] = format_time(task.canceled_at or now)
            return jsonify(answer)
        if status != "PENDING":
            output["scheduled_time"] = format_time(scheduled)
        if status == "SUCCEEDED":
            parameters = task.body.get("parameters")
            parameters = parameters if isinstance(parameters, dict) else {}
            output["end_time"] = format_time(finished)
            output["video_url"] = (
                f"{request.host_url}videos/{task.task_id}.mp4"
                f"?Expires={int(finished) + 86400}&Signature=simulated"
            )
            output["orig_prompt"] = task.prompt
            answer["usage"] = {
                "duration": usage_duration(task.prompt, parameters),
                "SR": resolution_sr(parameters),
                "video_count": 1,
            }
        elif status == "FAILED":
            output["end_time"] = format_time(finished)
            output["code"] = "InternalError.Algo"
            output["message"] = FAILED_MESSAGE
        return jsonify(answer)

    @app.post("/api/v1/tasks/<task_id>/cancel")
    def cancel(task_id: str) -> Any:
        """Cancel a task that is still PENDING."""
        with state.lock:
            state.cancels += 1
        key = authenticate()
        if not isinstance(key, str):
            return key
        task = visible_task(task_id, key)
        if task is None:
            return error(404, "NotFound", f"Task {task_id} not found.")
        with state.lock:
            # Check and flip under the lock so a racing cancel cannot succeed twice.
            if status_of(task, time.time()) != "PENDING":
                return error(
                    400,
                    "UnsupportedOperation",
                    "Failed to cancel the task, please confirm if the task status is PENDING.",
                )
            task.canceled_at = time.time()
        return jsonify(request_id=new_id())

    @app.get("/videos/<task_id>.mp4")
    def video(task_id: str) -> Response:
        """Serve a placeholder file so returned video URLs resolve."""
        return Response(b"\x00\x00\x00\x18ftypmp42simulated", mimetype="video/mp4")

    @app.get("/_sim/stats")
    def stats() -> Any:
        """Expose counters and the last submit so tests can see what reached upstream."""
        with state.lock:
            return jsonify(
                requests_total=state.requests_total,
                submits=state.submits,
                queries=state.queries,
                cancels=state.cancels,
                lists=state.lists,
                checks=state.checks,
                uploads=state.uploads,
                last_check=state.last_check,
                queries_by_task=dict(state.queries_by_task),
                tasks=len(state.tasks),
                last_submit=state.last_submit,
                # Enough to prove every created task has an owner and none was created twice.
                task_list=[
                    {
                        "task_id": task.task_id,
                        "owner_hint": task.owner[-6:],
                        "model": task.model,
                        "prompt": task.prompt,
                        # What upstream was asked with, e.g. the oss:// URLs a file became.
                        "input": task.body.get("input"),
                        "path": task.path,
                        "created": task.created,
                    }
                    for task in state.tasks.values()
                ],
                submits_by_prompt=dict(state.submits_by_prompt),
            )

    @app.post("/_sim/reset")
    def reset() -> Any:
        """Forget every task and counter."""
        state.reset()
        return jsonify(ok=True)

    return app
