"""Sample the gateway's gunicorn workers with py-spy under load and say where the time goes.

Two views per scenario, both from `py-spy record --format raw` (collapsed stacks):

- "GIL" (`--gil`): only the thread holding the GIL is sampled, so the shares are shares of
  the Python CPU time of the worker: what to make cheaper.
- "wall" (`--idle`, request threads only): every thread that is handling a request is
  sampled, waiting or not, so the shares say where a request's time goes: SQLite locks,
  pool waits, the logging lock, the upstream call.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Database work: through SQLAlchemy's Connection, or app/store/engine.py's DirectRead, whose own
# frame is the innermost one while the driver's C code runs a statement.
_DATABASE = r"\(sqlalchemy/|\(app/store/engine\.py"
_DRIVER_CALL = r"(do_execute|do_commit|fetchone|fetchall) \(sqlalchemy/|DirectRead\.first \(app/"

# (name, a frame anywhere on the stack, the innermost frame or None). A sample counts for
# every row it matches, so the shares are inclusive and add up to more than 100%.
OPERATIONS: tuple[tuple[str, str, str | None], ...] = (
    (
        "outside the app: gunicorn accept/parse/respond, thread pool",
        r"^(?!.*wsgi_app \(flask/)",
        None,
    ),
    ("key lookup (authenticate -> find_caller)", r"find_caller \(app/store/keys\.py", None),
    ("ownership query (get_owned_task)", r"get_owned_task \(app/store/tasks\.py", None),
    ("refresh claim UPDATE (claim_refresh)", r"claim_refresh \(app/store/tasks\.py", None),
    ("stored answer UPDATE (record_answer)", r"record_answer \(app/store/tasks\.py", None),
    ("task INSERT (record_task)", r"record_task \(app/store/tasks\.py", None),
    ("submit body json.loads + schema (load_submit_body)", r"load_submit_body \(app/", None),
    (
        "  of which schema validation (marshmallow)",
        r"load_submit_body \(app/.*\(marshmallow/",
        None,
    ),
    ("upstream HTTP call (DashScopeClient._send)", r"_send \(app/upstream\.py", None),
    (
        "  of which waiting for upstream's answer (socket read)",
        r"_send \(app/upstream\.py",
        r"(readinto \(socket\.py|do_poll \(urllib3/)",
    ),
    ("answer from the store (stored_answer)", r"stored_answer \(app/", None),
    ("JSON encode/decode (json module, anywhere)", r"\(json/", None),
    ("SQLAlchemy + sqlite3 (anywhere, DirectRead included)", _DATABASE, None),
    (
        "  of which statement execution in SQLite (incl. lock waits)",
        _DATABASE,
        _DRIVER_CALL,
    ),
    (
        "  of which waiting for this process's SQLite write lock (writing)",
        r"writing \(app/store/engine\.py",
        r"writing \(app/store/engine\.py",
    ),
    ("  of which waiting for a pooled connection", r"\(sqlalchemy/pool/", r"wait \(threading\.py"),
    (
        "  of which opening SQLite connections (pool overflow)",
        r"(_tune_sqlite|DefaultDialect\.connect) \(",
        None,
    ),
    ("  of which building/compiling SQL (Python)", r"\(sqlalchemy/", r"\(sqlalchemy/sql/"),
    ("logging (anywhere)", r"\(logging/|\(pythonjsonlogger/", None),
    (
        "  of which waiting for the log handler's lock",
        r"\(logging/",
        r"Handler\.acquire \(logging/",
    ),
    (
        "metrics (prometheus_client, app/observability)",
        r"\(prometheus_client/|\(app/observability/(metrics|access)\.py",
        None,
    ),
    ("request id (uuid4)", r"uuid4 \(uuid\.py", None),
)

# Where each sample's innermost Python frame is (exclusive: the shares add up to 100%).
LIBRARIES: tuple[tuple[str, str], ...] = (
    # First: DirectRead.first is app code, but its samples are the driver's C calls.
    ("SQLAlchemy + sqlite3 (incl. time inside sqlite3 C calls)", rf"\(sqlalchemy/|{_DRIVER_CALL}"),
    ("app code (app/)", r"\(app/"),
    ("requests + urllib3 + http.client", r"\((requests|urllib3|http)/"),
    ("socket / selectors", r"\((socket|ssl|selectors)\.py"),
    ("json", r"\(json/"),
    ("marshmallow", r"\(marshmallow/"),
    ("werkzeug", r"\(werkzeug/"),
    ("flask", r"\(flask/"),
    ("gunicorn", r"\(gunicorn/"),
    ("logging + pythonjsonlogger", r"\(logging/|\(pythonjsonlogger/"),
    ("prometheus_client", r"\(prometheus_client/"),
    ("threading / queue / concurrent.futures", r"\((threading|queue)\.py|\(concurrent/"),
    (
        "uuid / hashlib / email / re / typing / abc",
        r"\((uuid|hashlib|re|typing)\.py|\(email/|<frozen abc>",
    ),
)

# A request thread: gunicorn's gthread handler is on its stack. Pool threads waiting for
# work and the worker's main loop are not request threads.
REQUEST_THREAD = re.compile(r"handle \(gunicorn/workers/gthread\.py")
FRAME_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """Return the py-spy binary in this interpreter's environment or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(
    pid: int, seconds: int, out: Path, mode: str = "gil", fmt: str = "raw"
) -> subprocess.Popen[bytes]:
    """Start sampling one process for `seconds` (mode "gil" or "wall") into `out`."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed")
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            str(out),
            "--gil" if mode == "gil" else "--idle",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(spies: list[subprocess.Popen[bytes]], timeout: float) -> list[str]:
    """Wait up to `timeout` s for py-spy runs started by `record`; return each one's stderr.

    A run that overruns is interrupted as Ctrl-C would, which makes py-spy write the samples it
    took: a slow machine then gives a shorter profile rather than no benchmark report.
    """
    deadline = time.monotonic() + timeout
    errors = []
    for spy in spies:
        try:
            _, err = spy.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            err += f"\npy-spy overran {timeout:.0f} s and was interrupted".encode()
        errors.append(err.decode(errors="replace"))
    return errors


def read_stacks(paths: list[Path], request_threads_only: bool = False) -> Counter[str]:
    """Read collapsed stacks ("frame;frame;frame count") from py-spy raw files."""
    stacks: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if request_threads_only and not REQUEST_THREAD.search(stack):
                continue
            stacks[stack] += int(count)
    return stacks


def analyze(stacks: Counter[str], top: int = 15) -> dict[str, Any]:
    """Return inclusive operation shares, exclusive library shares and the top self frames."""
    total = sum(stacks.values())
    if not total:
        return {"samples": 0, "operations": [], "libraries": [], "self": []}
    operations = []
    for name, anywhere, innermost in OPERATIONS:
        stack_re = re.compile(anywhere)
        leaf_re = re.compile(innermost) if innermost else None
        hits = sum(
            n
            for stack, n in stacks.items()
            if stack_re.search(stack)
            and (leaf_re is None or leaf_re.search(stack.rsplit(";", 1)[-1]))
        )
        operations.append((name, 100.0 * hits / total))
    libraries: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        leaf = stack.rsplit(";", 1)[-1]
        leaves[FRAME_LINE.sub(")", leaf)] += n
        for name, pattern in LIBRARIES:
            if re.search(pattern, leaf):
                libraries[name] += n
                break
        else:
            libraries["other"] += n
    return {
        "samples": total,
        "operations": operations,
        "libraries": [(name, 100.0 * n / total) for name, n in libraries.most_common()],
        "self": [(frame, 100.0 * n / total) for frame, n in leaves.most_common(top)],
    }
