"""Count the instructions one gateway request costs, with callgrind: repeatable on a busy machine.

Wall-clock figures move with whatever else the machine does; an instruction count does not.
The app of a checkout (this one, or another, such as the commit before a change) is called
in-process through Flask's test client, against the simulator as a separate process (which
callgrind does not count), on a fresh SQLite file. Each kind of request is run twice under
`valgrind --tool=callgrind`, with WARMUP and then WARMUP + REQUESTS requests; the difference
over REQUESTS is the cost of one request, start-up and warm-up excluded:

    python bench/instructions.py                         # this checkout
    python bench/instructions.py --repo /work/before     # another checkout, with its .venv

Only what every version of the gateway has is used: `create_app()`, the
`bailian-gateway keys create` command, GATEWAY_CONFIG and GATEWAY_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BENCH_REPO = Path(__file__).resolve().parents[1]
MODEL = "wan2.5-t2v-preview"
UPSTREAM_KEY = "sk-bench-instructions"
KINDS = ("submit", "query_running", "query_finished")

# Runs inside callgrind, in the measured checkout's interpreter: N requests of one kind.
DRIVER = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, filename=sys.argv[4])
    from app import create_app
    app = create_app()  # as wsgi.py makes it, but without the reconciler's background passes
    kind, count, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client = app.test_client()
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    body = json.dumps({
        "model": sys.argv[5],
        "input": {"prompt": "a cat surfing"},
        "parameters": {"resolution": "480P", "duration": 5},
    })
    path = "/alibailian/api/v1/services/aigc/video-generation/video-synthesis"

    def submit(prompt="a cat surfing"):
        answer = client.post(path, data=body.replace("a cat surfing", prompt), headers=headers)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        return answer.json["output"]["task_id"]

    if kind == "submit":
        for _ in range(count):
            submit()
    else:
        task_id = submit()
        for _ in range(count):
            answer = client.get("/alibailian/api/v1/tasks/" + task_id, headers=headers)
            assert answer.status_code == 200, answer.get_data(as_text=True)
    """
)


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    """Wait until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def total_instructions(out_file: Path) -> int:
    """Return the instruction total of a callgrind output file."""
    match = re.search(r"^(?:summary|totals): (\d+)", out_file.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{out_file}: no instruction total")
    return int(match.group(1))


def start_simulator(port: int, running_seconds: str) -> subprocess.Popen[bytes]:
    """Start the simulator on a port: its tasks run for so many seconds, then succeed."""
    simulator = subprocess.Popen(
        [
            *(sys.executable, "-m", "simulator", "--port", str(port), "--keys", UPSTREAM_KEY),
            *("--pending-seconds", "0", "--running-seconds", running_seconds),
        ],
        cwd=BENCH_REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return simulator


def measure(repo: Path, kind: str, warmup: int, requests: int, work: Path) -> float:
    """Return the instructions of one request of `kind` against the app in `repo`."""
    port = free_port()
    # A finished task is answered from the store; a running one asks the simulator each time.
    simulator = start_simulator(port, "0" if kind == "query_finished" else "1e9")
    try:
        return _measure(repo, kind, warmup, requests, work, f"http://127.0.0.1:{port}")
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)


def _measure(repo: Path, kind: str, warmup: int, requests: int, work: Path, url: str) -> float:
    python = repo / ".venv" / "bin" / "python"
    config = work / f"{kind}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [tasks]
            refresh_interval = 0

            [[channels]]
            name = "sim"
            base_url = "{url}"
            api_key_env = "BENCH_UPSTREAM_KEY"
            models = ["{MODEL}"]

            [models."{MODEL}".price_per_second]
            "480P" = 0.3
            """
        )
    )
    totals = []
    for count in (warmup, warmup + requests):
        database = work / f"{kind}-{count}.sqlite3"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_DATABASE_URL": f"sqlite:///{database}",
            "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
            "PYTHONHASHSEED": "0",
        }
        made = subprocess.run(
            [str(repo / ".venv" / "bin" / "bailian-gateway"), "keys", "create", "bench"],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
        key = made.stdout.strip().splitlines()[-1]
        out_file = work / f"callgrind-{kind}-{count}.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out_file}",
                str(python),
                "-c",
                DRIVER,
                kind,
                str(count),
                key,
                str(work / f"{kind}-{count}.log"),
                MODEL,
            ],
            env=env,
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        totals.append(total_instructions(out_file))
    return (totals[1] - totals[0]) / requests


def main(argv: list[str]) -> int:
    """Measure each kind of request and print one JSON object of instructions per request."""
    parser = argparse.ArgumentParser(prog="bench/instructions.py", description=__doc__)
    parser.add_argument("--repo", type=Path, default=BENCH_REPO, help="the checkout to measure")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS)
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as work:
        figures = {
            kind: round(measure(args.repo.resolve(), kind, args.warmup, args.requests, Path(work)))
            for kind in args.kinds.split(",")
        }
    print(json.dumps({"repo": str(args.repo), "instructions_per_request": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
