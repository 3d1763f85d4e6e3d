"""Turn a run's measurements into bench/results/<date>.md (and a PNG chart of the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET_LABELS = {
    "direct": "direct (fake)",
    "nginx": "nginx proxy_pass",
    "floor": "Flask floor",
    "gateway": "gateway",
}
MB = 1024 * 1024


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or reference == 0:
        return "n/a"
    return ratio_text(value / reference)


def ratio_text(ratio: float) -> str:
    """A ratio readable at any size: 1,234x, 12.3x, 1.23x, 0.0028x."""
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    if ratio >= 0.1 or ratio == 0:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x"


def _num(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _ref(case: dict[str, Any], target: str, metric: str) -> float | None:
    found = case["targets"].get(target)
    return None if found is None else float(found["median"][metric])


def results_table(cases: list[dict[str, Any]]) -> list[str]:
    """One row per scenario, connection count and target: every figure and its ratios."""
    lines = [
        "| # | scenario | conns | target | req/s | ÷direct | ÷nginx | p50 ms | ÷direct "
        "| ÷nginx | p99 ms | ÷direct | ÷nginx | errors "
        "| gunicorn CPU: cores (busiest worker), per request, kernel share |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for target, data in case["targets"].items():
            m = data["median"]
            cells = [
                case["number"],
                case["title"],
                str(case["conns"]),
                TARGET_LABELS[target],
            ]
            for metric, digits in (("rps", 0), ("p50_ms", 2), ("p99_ms", 2)):
                cells += [
                    _num(m[metric], digits),
                    _ratio(m[metric], _ref(case, "direct", metric)),
                    _ratio(m[metric], _ref(case, "nginx", metric)),
                ]
            cells.append(_num(m["errors"], 0))
            if "cpu_cores" in m:
                per_request = 1000 * m["cpu_cores"] / m["rps"] if m["rps"] else 0.0
                cells.append(
                    f"{m['cpu_cores']:.2f} ({m['busiest_worker']:.0%}), {per_request:.2f} ms/req, "
                    f"{m['system_share']:.0%} sys"
                )
            else:
                cells.append("—")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def burst_table(burst: dict[str, Any]) -> list[str]:
    """The concurrent big submits: success, timing, memory, with ratios to the references."""
    lines = [
        "| target | ok | wall s | ÷direct | ÷nginx | p50 ms | p99 ms | ÷direct | ÷nginx "
        "| gunicorn RSS before → peak MiB | peak growth MiB | growth ÷ bytes in flight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    targets = burst["targets"]

    def ref(target: str, metric: str) -> float | None:
        found = targets.get(target)
        return None if found is None else float(found["median"][metric])

    for target, data in targets.items():
        m = data["median"]
        memory = growth = per_byte = "—"
        if target == "gateway":
            memory = f"{m['baseline_rss'] / MB:,.0f} → {m['peak_rss'] / MB:,.0f}"
            growth = f"{m['growth'] / MB:,.0f} (max {data['max_growth'] / MB:,.0f})"
            in_flight = burst["bytes_in_flight"]
            per_byte = f"{m['growth'] / in_flight:.2f} (max {data['max_growth'] / in_flight:.2f})"
        lines.append(
            "| "
            + " | ".join(
                [
                    TARGET_LABELS[target],
                    f"{m['ok']:.0f}/{burst['count']}",
                    _num(m["wall_s"], 2),
                    _ratio(m["wall_s"], ref("direct", "wall_s")),
                    _ratio(m["wall_s"], ref("nginx", "wall_s")),
                    _num(m["p50_ms"], 0),
                    _num(m["p99_ms"], 0),
                    _ratio(m["p99_ms"], ref("direct", "p99_ms")),
                    _ratio(m["p99_ms"], ref("nginx", "p99_ms")),
                    memory,
                    growth,
                    per_byte,
                ]
            )
            + " |"
        )
    return lines


def targets_table(checks: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, what was measured, and whether the gateway met them."""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for check in checks:
        verdict = "meets" if check["ok"] else "**misses**"
        lines.append(f"| {check['target']} | {check['measured']} | {verdict} |")
    return lines


def profile_section(profile: dict[str, Any]) -> list[str]:
    """Where the workers' time went, per profiled scenario, in both views."""
    lines = ["## Profile (py-spy on the gunicorn workers)", "", profile.get("note", ""), ""]
    for data in profile.get("scenarios", {}).values():
        gil, wall = data["views"]["gil"], data["views"]["wall"]
        lines += [
            f"### {data['title']}",
            "",
            f"{gil['samples']:,} GIL samples and {wall['samples']:,} request-thread samples "
            f"from {data['workers']} workers ({data['rps']:,.0f} req/s while sampled). "
            f"Flame graph: `{data['svg'] or 'n/a'}`; collapsed stacks: "
            + ", ".join(f"`{name}`" for name in data["raw"])
            + ".",
            "",
            "| operation (inclusive) | % of Python CPU (GIL) | % of request wall time |",
            "|---|---:|---:|",
        ]
        walls = dict(wall["operations"])
        for op, pct in gil["operations"]:
            lines.append(f"| {op} | {pct:.1f} | {walls.get(op, 0.0):.1f} |")
        lines += [
            "",
            "| innermost frame is in (exclusive) | % of Python CPU (GIL) "
            "| % of request wall time |",
            "|---|---:|---:|",
        ]
        wall_libs = dict(wall["libraries"])
        names = [name for name, _ in gil["libraries"]]
        names += [name for name, _ in wall["libraries"] if name not in names]
        gil_libs = dict(gil["libraries"])
        for name in names:
            lines.append(
                f"| {name} | {gil_libs.get(name, 0.0):.1f} | {wall_libs.get(name, 0.0):.1f} |"
            )
        for label, view in (("Python CPU (GIL)", gil), ("request wall time", wall)):
            lines += ["", f"| top self frames, {label} | % |", "|---|---:|"]
            lines += [f"| `{frame}` | {pct:.1f} |" for frame, pct in view["self"][:12]]
        lines.append("")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The whole report."""
    meta = data["meta"]
    lines = [
        f"# bailian-gateway benchmark, {meta['date']}{' (smoke)' if meta['smoke'] else ''}",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['cpus']} CPUs, {meta['platform']}; "
        f"Python {meta['python']}; load driver: {meta['driver']}; "
        f"zero-latency fake: {meta['fake']}; "
        f"slow fake: {meta['slow_fake']}.",
        "",
        f"Gateway: shipped `gunicorn.conf.py` ({meta['gunicorn']}), SQLite in a temp dir, "
        "key made with `bailian-gateway keys create`, `[tasks] refresh_interval = 0` (every "
        "query of a running task goes upstream). References measured in the same run: the "
        "fake hit directly"
        + (
            ", and an nginx `proxy_pass` (upstream keepalive) in front of it."
            if meta["nginx_reference"]
            else "; nginx is not installed, so there is no nginx reference (n/a)."
        )
        + " For scenarios 1 to 3, the Flask floor: `bench/floor_app.py`, a Flask app under "
        "the same `gunicorn.conf.py` that answers the same routes with canned JSON and does "
        "no gateway work (no key, store, upstream call, log line or metric); it is what "
        "Flask and gunicorn alone cost here, a ceiling for the gateway."
        + " The last column is the CPU the gunicorn processes used during the run, in "
        "cores, the busiest worker's share of it, CPU time per request, and the share of "
        "it spent in the kernel.",
        "",
        *(
            [
                "**Smoke run**: tiny loads to prove the benchmark still works; its figures "
                "and verdicts mean nothing.",
                "",
            ]
            if meta["smoke"]
            else []
        ),
        f"Each figure is the median of {meta['runs']} runs of {meta['duration']} s "
        f"({meta.get('slow_duration', meta['duration'])} s for scenario 4: each run opens "
        "its connections at once, and in short runs that first wave alone would set the "
        f"p99) after a {meta['warmup']} s warm-up; p50/p99 are request latencies; errors are "
        "non-2xx answers plus socket errors and timeouts. Everything (load generator, "
        "fakes, nginx, gateway) shares the same CPUs; 1-minute load average before the run: "
        f"{meta['loadavg'][0]:.2f}, after: {meta['loadavg'][1]:.2f}.",
        "",
        "## Results",
        "",
        *results_table(data["cases"]),
        "",
        f"### {data['burst']['title']}",
        "",
        f"{data['burst']['count']} submits of a {data['burst']['body_bytes'] / 1e6:.1f} MB "
        f"body ({data['burst']['image_chars'] / 1e6:.1f} MB base64 image) sent at once, each "
        f"on its own connection; bytes in flight: "
        f"{data['burst']['bytes_in_flight'] / MB:,.0f} MiB. Memory: RSS of the gunicorn "
        "master and workers added up, sampled every 5 ms; growth is the peak minus the RSS "
        "just before the burst (median of the runs, and the worst run).",
        "",
        *burst_table(data["burst"]),
        "",
        "## Targets",
        "",
        *targets_table(data["checks"]),
        "",
    ]
    if meta.get("gateway_log"):
        log = meta["gateway_log"]
        lines += [
            "## Gateway log",
            "",
            f"{log['lines']} lines; {log['warnings']} warnings, {log['errors']} errors.",
            "",
        ]
        lines += [f"    {line}" for line in log["samples"]]
        lines.append("")
    if data.get("profile"):
        lines += profile_section(data["profile"])
    if meta.get("png"):
        lines += ["## Chart", "", f"![results]({meta['png']})", ""]
    return "\n".join(lines)


def chart(data: dict[str, Any], out: Path) -> None:
    """A PNG of the same figures: req/s, p50, p99 per scenario and target, and the burst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    labels = [f"{c['number']}. {c['short']}\n@{c['conns']}" for c in cases]
    targets = [t for t in TARGET_LABELS if any(t in c["targets"] for c in cases)]
    colours = {"direct": "#9aa5b1", "nginx": "#4c9f70", "floor": "#edae49", "gateway": "#d1495b"}
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    width = 0.8 / len(targets)
    panels = (
        (axes[0][0], "rps", "req/s (higher is better)"),
        (axes[0][1], "p50_ms", "p50 latency, ms (lower is better)"),
        (axes[1][0], "p99_ms", "p99 latency, ms (lower is better)"),
    )
    for ax, metric, title in panels:
        for i, target in enumerate(targets):
            xs, ys = [], []
            for x, case in enumerate(cases):
                if target in case["targets"]:
                    xs.append(x + (i - (len(targets) - 1) / 2) * width)
                    ys.append(max(case["targets"][target]["median"][metric], 1e-3))
            bars = ax.bar(xs, ys, width, label=TARGET_LABELS[target], color=colours[target])
            if target == "gateway":
                for bar, case in zip(
                    bars, [c for c in cases if "gateway" in c["targets"]], strict=True
                ):
                    direct = _ref(case, "direct", metric)
                    if direct:
                        ax.annotate(
                            ratio_text(case["targets"]["gateway"]["median"][metric] / direct),
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
        ax.set_yscale("log")
        ax.set_title(title + "; labels: gateway ÷ direct")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    burst = data["burst"]
    names = list(burst["targets"])
    xs = range(len(names))
    p50 = [burst["targets"][n]["median"]["p50_ms"] for n in names]
    p99 = [burst["targets"][n]["median"]["p99_ms"] for n in names]
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50 ms", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99 ms", color="#d1495b")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([TARGET_LABELS[n] for n in names])
    gateway = burst["targets"].get("gateway")
    if gateway:
        growth = gateway["median"]["growth"]
        ax.set_title(
            f"5. {burst['count']} concurrent {burst['body_bytes'] / 1e6:.0f} MB submits; "
            f"gunicorn RSS growth {growth / MB:,.0f} MiB = "
            f"{growth / burst['bytes_in_flight']:.2f}x bytes in flight",
            fontsize=10,
        )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    meta = data["meta"]
    fig.suptitle(
        f"bailian-gateway benchmark {meta['date']}: median of {meta['runs']} runs x "
        f"{meta['duration']} s ({meta.get('slow_duration', meta['duration'])} s for 4), "
        f"{meta['driver']}, fake: {meta['fake']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
