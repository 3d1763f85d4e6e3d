"""Run the DashScope simulator as a process: python -m simulator --port 8001."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from werkzeug.serving import make_server

from simulator.app import create_simulator

EPILOG = """\
prompt markers (anywhere in input.prompt of a submit; docs/simulator.md has the details):
  [sleep=N]         sleep N seconds BEFORE creating the task (the client may give up first)
  [answer-after=N]  create and store the task, THEN sleep N seconds before answering
                    (overrides --answer-after for this submit)
  [moderate]        400 DataInspectionFailed, no task
  [throttle]        429 Throttling.RateQuota, no task
  [error500]        500 InternalError, no task
  [fail]            the task ends FAILED (InternalError.Algo) instead of SUCCEEDED
  [pending=N]       the task stays PENDING N seconds instead of --pending-seconds
  [duration=S]      the SUCCEEDED usage reports S seconds (4.5 too), not the submitted ones

test-only routes: GET /_sim/stats (counters, task_list, submits_by_prompt, last_submit),
POST /_sim/reset (forget every task and counter)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags, falling back to SIMULATOR_* environment variables."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=env("SIMULATOR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("SIMULATOR_PORT", "8001")))
    parser.add_argument(
        "--keys",
        default=env("SIMULATOR_KEYS", ""),
        help="comma-separated accepted API keys; empty accepts any bearer token",
    )
    parser.add_argument(
        "--pending-seconds",
        type=float,
        default=float(env("SIMULATOR_PENDING_SECONDS", "0.5")),
        help="how long a new task stays PENDING (default %(default)s)",
    )
    parser.add_argument(
        "--running-seconds",
        type=float,
        default=float(env("SIMULATOR_RUNNING_SECONDS", "1.0")),
        help="how long a task then stays RUNNING before it ends (default %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=float(env("SIMULATOR_LATENCY_MS", "0")),
        help="delay added to every /api/v1 request, before it is handled (default %(default)s)",
    )
    parser.add_argument(
        "--answer-after",
        type=float,
        default=float(env("SIMULATOR_ANSWER_AFTER_SECONDS", "0")),
        metavar="SECONDS",
        help="delay every submit's answer after its task is created (default %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=env("SIMULATOR_ACCESS_LOG", "") not in ("", "0"),
        help="log every request to stderr (off by default so an unread pipe cannot fill up)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve the simulator until SIGTERM or SIGINT."""
    args = parse_args(argv)
    app = create_simulator(
        {
            "keys": [k.strip() for k in args.keys.split(",") if k.strip()],
            "pending_seconds": args.pending_seconds,
            "running_seconds": args.running_seconds,
            "latency_ms": args.latency_ms,
            "answer_after_seconds": args.answer_after,
        }
    )
    if not args.access_log:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = make_server(args.host, args.port, app, threaded=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Serve from a worker thread: shutdown() deadlocks if called from serve_forever's thread.
    worker = threading.Thread(target=server.serve_forever, name="simulator", daemon=True)
    worker.start()
    print(f"simulator listening on http://{args.host}:{server.server_port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    worker.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
