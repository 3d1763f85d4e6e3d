"""The floor reference: Flask under the shipped gunicorn.conf.py, answering canned JSON.

It serves the gateway's query and submit routes with no gateway work at all (no key, no store,
no upstream call, no log line, no metric), so it measures what Flask and gunicorn cost per
request on this machine: the gateway cannot be faster than this, whatever it does.
"""

from __future__ import annotations

import json
import uuid

from flask import Flask, Response, request
from services import API_PREFIX, DONE_BODY, SUBMIT_BODY

app = Flask(__name__)

# nginx's canned answers, with nginx's variables filled in once.
_DONE = DONE_BODY.replace("$request_id", uuid.uuid4().hex).replace("$1", "floor-task")
_SUBMIT = SUBMIT_BODY.replace("$request_id", uuid.uuid4().hex)


@app.get(f"{API_PREFIX}/tasks/<task_id>")
def query_task(task_id: str) -> Response:
    """Answer a finished task, whatever the id."""
    return Response(_DONE, mimetype="application/json")


@app.post(f"{API_PREFIX}/services/aigc/<group>/video-synthesis")
def submit_task(group: str) -> Response:
    """Read the body and answer a new PENDING task."""
    request.get_data()
    return Response(_SUBMIT, mimetype="application/json")


@app.get("/readyz")
def ready() -> Response:
    """Say the server is up."""
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")
