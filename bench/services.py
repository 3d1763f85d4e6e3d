"""The processes a benchmark run starts: fakes of DashScope, nginx references, the gateway.

Every process is started by this module, on a free loopback port, with its output in a log
file under the run's work directory, and stopped by the `Stack` that started it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
API_PREFIX = "/alibailian/api/v1"

# One gateway model per fake, so a submit's model picks the fake that answers it.
RUNNING_MODEL = "bench-running"  # zero-latency fake whose tasks stay RUNNING
DONE_MODEL = "bench-done"  # zero-latency fake whose tasks are SUCCEEDED on the first query
SLOW_MODEL = "bench-slow"  # the fake with a fixed upstream latency; tasks stay RUNNING
CHANNEL_KEY_ENV = "BENCH_CHANNEL_KEY"
CHANNEL_KEY = "sk-bench-channel-0123456789abcdef"
HUGE_SECONDS = 10**9  # a simulator task that is RUNNING for this long never finishes
# gunicorn.conf.py's default, one worker per usable CPU; the bench never overrides it.
SHIPPED_WORKERS = len(os.sched_getaffinity(0))
# Debian's libnginx-mod-http-echo: `echo_sleep` answers after a delay without using the CPU.
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def free_port() -> int:
    """Return a loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """This process's environment without anything that could steer the gateway."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GATEWAY_", "DASHSCOPE_", "SIMULATOR_", "FLASK_"))
    }


def wait_for_port(port: int, process: subprocess.Popen[Any], what: str, timeout: float) -> None:
    """Wait until something accepts connections on the port, or fail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> int:
    """GET a URL and return the status (any status, not only 2xx)."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def rss_bytes(pid: int) -> int:
    """Return a process's resident set size in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def process_cpu_clock(pid: int) -> int:
    """Return the clock id of a process's CPU time, as clock_getcpuclockid(3) makes it."""
    # Python has no clock_getcpuclockid; Linux's id is this (MAKE_PROCESS_CPUCLOCK(pid,
    # CPUCLOCK_SCHED)), the one glibc returns.
    return ((~pid) << 3) | 2


def cpu_times(pid: int) -> tuple[float, float]:
    """Return the user and system CPU seconds a process has used (0, 0 once it is gone)."""
    try:
        # The total to the nanosecond, threads gone included: stat's counts are whole clock
        # ticks (10 ms), and a short run of a few requests could show none.
        total = time.clock_gettime(process_cpu_clock(pid))
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # Field 15 of stat (stime), counted after the ")" that ends the name: only for the share of
    # the total that was the kernel's.
    system = min(total, int(fields[12]) / os.sysconf("SC_CLK_TCK"))
    return total - system, system


def child_pids(pid: int) -> list[int]:
    """Return the direct children of a process (Linux /proc)."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(p) for p in handle.read().split())
    except OSError:
        pass
    return children


@dataclass
class Proc:
    """A process this run started, with where its output goes."""

    name: str
    process: subprocess.Popen[Any]
    log_path: Path

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process, wait, and SIGKILL it if it will not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of the process's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Endpoints:
    """Base URLs (origins) of everything the scenarios aim at."""

    fake_running: str
    fake_done: str
    fake_slow: str
    proxy_running: str | None = None
    proxy_done: str | None = None
    proxy_slow: str | None = None


@dataclass
class GatewayInfo:
    """A gunicorn server the bench started: the gateway, or the Flask floor (no key)."""

    url: str
    key: str
    master: Proc
    env: dict[str, str]

    def pids(self) -> list[int]:
        """Return the gunicorn master and its workers."""
        return [self.master.process.pid, *child_pids(self.master.process.pid)]

    def worker_pids(self) -> list[int]:
        """Return the gunicorn workers."""
        return child_pids(self.master.process.pid)

    def cpu(self) -> dict[int, tuple[float, float]]:
        """Return the user and system CPU seconds used so far by the master and each worker."""
        return {pid: cpu_times(pid) for pid in self.pids()}

    def rss_sum(self) -> int:
        """Return the RSS of all gunicorn processes, added up."""
        return sum(rss_bytes(pid) for pid in self.pids())


# --------------------------------------------------------------------------- nginx configs

NGINX_MAIN = """\
{modules}{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_max_body_size 32m;
{servers}
}}
"""

# Canned DashScope answers. `$request_id` is nginx's 32-hex random id per request, so every
# submit answers a fresh task id (a fixed one would collide in the gateway's tasks table).
FAKE_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location ~ ^/api/v1/services/aigc/[a-z0-9-]+/video-synthesis$ {{
            {submit_answer}
        }}
        location ~ ^/api/v1/tasks/([A-Za-z0-9_-]+)$ {{
            {query_answer}
        }}
        location / {{
            return 404 '{{"request_id":"$request_id","code":"NotFound","message":"not found"}}';
        }}
    }}
"""

SUBMIT_BODY = (
    '{"request_id":"$request_id","output":{"task_id":"$request_id","task_status":"PENDING"}}'
)
RUNNING_BODY = (
    '{"request_id":"$request_id","output":{"task_id":"$1","task_status":"RUNNING",'
    '"submit_time":"2025-01-01 00:00:00.000","scheduled_time":"2025-01-01 00:00:00.100"}}'
)
DONE_BODY = (
    '{"request_id":"$request_id","output":{"task_id":"$1","task_status":"SUCCEEDED",'
    '"submit_time":"2025-01-01 00:00:00.000","scheduled_time":"2025-01-01 00:00:00.100",'
    '"end_time":"2025-01-01 00:01:00.000",'
    '"video_url":"http://127.0.0.1/videos/$1.mp4?Expires=1735693260&Signature=canned",'
    '"orig_prompt":"a cat surfing"},"usage":{"duration":5,"SR":720,"video_count":1}}'
)


def canned_answer(body: str, delay_seconds: float = 0) -> str:
    """The nginx directives answering `body`: at once, or after a delay (ECHO_MODULE)."""
    if not delay_seconds:
        return f"return 200 '{body}';"
    # echo_sleep waits on a timer, not a thread: the delay costs no CPU.
    return f"echo_sleep {delay_seconds:.3f}; echo '{body}';"


PROXY_SERVER = """\
    upstream {name} {{
        server {target};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 60s;
        }}
    }}
"""


def gateway_config(endpoints: Endpoints) -> str:
    """The gateway's TOML for the benchmark: one channel per fake, refresh on every query."""
    channels = (
        ("fake-running", endpoints.fake_running, RUNNING_MODEL),
        ("fake-done", endpoints.fake_done, DONE_MODEL),
        ("fake-slow", endpoints.fake_slow, SLOW_MODEL),
    )
    text = textwrap.dedent(
        """\
        # Written by bench/run.py. refresh_interval = 0: every query of a running task
        # goes upstream, which is the path scenario "query running" measures.
        [upstream]
        connect_timeout = 5
        read_timeout = 30

        [tasks]
        refresh_interval = 0
        """
    )
    for name, url, model in channels:
        text += textwrap.dedent(
            f"""
            [[channels]]
            name = "{name}"
            base_url = "{url}"
            api_key_env = "{CHANNEL_KEY_ENV}"
            models = ["{model}"]

            [models."{model}".price_per_second]
            "480P" = 0.3
            "720P" = 0.6
            """
        )
    return text


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """Everything one run starts, stopped in reverse order by `close()`."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    # ---- generic

    def _popen(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=env or clean_environ(),
                stdout=stdout if stdout is not None else log,
                stderr=log,
                start_new_session=True,  # Ctrl-C on the run reaches us, not them
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process this stack started, newest first."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    # ---- the DashScope simulator

    def simulator(
        self, name: str, *, running_seconds: float, latency_ms: float = 0, timeout: float = 30
    ) -> str:
        """Start `python -m simulator` and return its origin."""
        proc = self._popen(
            name,
            [
                sys.executable,
                "-m",
                "simulator",
                "--port",
                "0",
                "--keys",
                CHANNEL_KEY,
                "--pending-seconds",
                "0",
                "--running-seconds",
                str(running_seconds),
                "--latency-ms",
                str(latency_ms),
            ],
            stdout=subprocess.PIPE,
        )
        stdout = proc.process.stdout
        assert stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(stdout.readline().decode()), daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{name} did not start:\n{proc.log_tail()}") from None
        prefix = "simulator listening on "
        if not line.startswith(prefix):
            raise RuntimeError(f"{name}: unexpected output {line!r}:\n{proc.log_tail()}")
        return line[len(prefix) :].strip()

    # ---- nginx

    def nginx(
        self, name: str, servers: str, ports: list[int], modules: tuple[Path, ...] = ()
    ) -> None:
        """Start an nginx of its own (prefix in the work directory) with these servers."""
        prefix = self.workdir / name
        prefix.mkdir(parents=True, exist_ok=True)
        # Workers write request bodies to the prefix; as root they would otherwise be nobody.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        loads = "".join(f"load_module {module};\n" for module in modules)
        conf.write_text(
            NGINX_MAIN.format(modules=loads, user=user, workers=2, prefix=prefix, servers=servers)
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = self._popen(
            name, [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
        )
        for port in ports:
            wait_for_port(port, proc.process, name, timeout=15)

    def nginx_fakes(self) -> tuple[str, str]:
        """Start the zero-latency canned fake (running and finished servers); return origins."""
        running, done = free_port(), free_port()
        servers = "".join(
            FAKE_SERVER.format(
                port=port,
                submit_answer=canned_answer(SUBMIT_BODY),
                query_answer=canned_answer(body),
            )
            for port, body in ((running, RUNNING_BODY), (done, DONE_BODY))
        )
        self.nginx("nginx-fake", servers, [running, done])
        return f"http://127.0.0.1:{running}", f"http://127.0.0.1:{done}"

    def nginx_slow_fake(self, latency_ms: float) -> str:
        """Start the canned fake answering after a fixed delay (needs ECHO_MODULE); its origin."""
        port = free_port()
        delay = latency_ms / 1000
        server = FAKE_SERVER.format(
            port=port,
            submit_answer=canned_answer(SUBMIT_BODY, delay),
            query_answer=canned_answer(RUNNING_BODY, delay),
        )
        self.nginx("nginx-slow-fake", server, [port], modules=(ECHO_MODULE,))
        return f"http://127.0.0.1:{port}"

    def nginx_proxies(self, targets: dict[str, str]) -> dict[str, str]:
        """Start one nginx with a proxy_pass server in front of each target origin."""
        servers, ports, origins = "", [], {}
        for name, origin in targets.items():
            port = free_port()
            servers += PROXY_SERVER.format(
                name=f"up_{name}", target=origin.removeprefix("http://"), port=port
            )
            ports.append(port)
            origins[name] = f"http://127.0.0.1:{port}"
        self.nginx("nginx-proxy", servers, ports)
        return origins

    # ---- the gateway

    def gateway(self, endpoints: Endpoints) -> GatewayInfo:
        """Start the gateway with the shipped gunicorn.conf.py, SQLite, and a CLI-made key."""
        config = self.workdir / "gateway.toml"
        config.write_text(gateway_config(endpoints))
        log_path = self.workdir / "gateway.log"
        env = {
            **clean_environ(),
            CHANNEL_KEY_ENV: CHANNEL_KEY,
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_DATABASE_URL": f"sqlite:///{self.workdir / 'gateway.sqlite3'}",
            "GATEWAY_ERROR_LOG": str(log_path),
            "PYTHONUNBUFFERED": "1",
        }
        created = subprocess.run(
            [str(BIN_DIR / "bailian-gateway"), "keys", "create", "bench"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"bailian-gateway keys create failed:\n{created.stderr}")
        key = created.stdout.strip().splitlines()[-1].strip()
        master, url = self._gunicorn("gunicorn", "wsgi:app", env, log_path)
        return GatewayInfo(url=url, key=key, master=master, env=env)

    def flask_floor(self) -> GatewayInfo:
        """Start bench/floor_app.py under the shipped gunicorn.conf.py (see that module)."""
        log_path = self.workdir / "floor.log"
        env = {**clean_environ(), "GATEWAY_ERROR_LOG": str(log_path), "PYTHONUNBUFFERED": "1"}
        bench_dir = str(Path(__file__).resolve().parent)
        master, url = self._gunicorn(
            "floor", "floor_app:app", env, log_path, extra_args=["--pythonpath", bench_dir]
        )
        return GatewayInfo(url=url, key="", master=master, env=env)

    def _gunicorn(
        self,
        name: str,
        wsgi_app: str,
        env: dict[str, str],
        log_path: Path,
        extra_args: list[str] | None = None,
    ) -> tuple[Proc, str]:
        """Start gunicorn with the shipped gunicorn.conf.py; wait for /readyz and its workers."""
        port = free_port()
        master = self._popen(
            name,
            [
                str(BIN_DIR / "gunicorn"),
                "-c",
                "gunicorn.conf.py",
                "-b",
                f"127.0.0.1:{port}",
                *(extra_args or []),
                wsgi_app,
            ],
            env=env,
        )
        # gunicorn writes to GATEWAY_ERROR_LOG; the Proc's own log only catches early crashes.
        master.log_path = log_path
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if master.process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{master.log_tail()}")
            try:
                if http_get(f"{url}/readyz", timeout=2) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{name} did not become ready:\n{master.log_tail()}")
        # Every worker must be up before anything is measured.
        deadline = time.monotonic() + 30
        while len(child_pids(master.process.pid)) < SHIPPED_WORKERS:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return master, url
