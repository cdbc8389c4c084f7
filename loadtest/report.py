"""docs/benchmarks.md, docs/benchmarks.json and docs/plots/*.png from one `loadtest.bench` run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

TARGETS_TEXT = """\
| target (issue 6) | measured here |
|---|---|
| 1,000 subscribers in 100 groups: >= 20x the reference app's max sustainable rate | {ratio} |
| 1,000 subscribers in one group: p99 <= 100 ms at >= 50 msg/s | {one} |
| one broadcast reaches the last of 5,000 members in <= 100 ms | {bcast} |
| <= 20 KiB server memory per idle connection | {mem} |
| >= 1,500 new connections per second | {conn} |
"""


def _fmt(x: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}{unit}"


def plots(results: dict[str, Any], plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    files = []
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in results["ramps"]:
        by_shape.setdefault(r["shape"], []).append(r)
    for i, (shape, ramps) in enumerate(by_shape.items()):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r, color in zip(ramps, ("tab:blue", "tab:green", "tab:red", "tab:purple"), strict=False):
            steps = _median_steps(r["steps"])
            rates = [s["rate"] for s in steps]
            for q, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p999_ms", "--")):
                vals = [max(s["summary"]["latency"][q], 0.01) for s in steps]
                ax.plot(rates, vals, style, marker="o", ms=3, color=color, label=f"{r['target']} {q[:-3]}")
        ax.axhline(100, color="grey", lw=0.8)
        ax.text(ax.get_xlim()[0], 110, "p99 SLO 100 ms", color="grey", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("publish rate (messages/s, open loop)")
        ax.set_ylabel("delivery latency (ms)")
        ax.set_title(f"{shape}: latency percentiles vs publish rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        name = f"latency-{i + 1}-{shape.split(' in ')[-1].replace(' ', '-')}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def write_report(results: dict[str, Any], out: str, argv: Sequence[str] = ()) -> None:
    docs = os.path.dirname(out)
    with open(os.path.join(docs, "benchmarks.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    files = plots(results, os.path.join(docs, "plots"))
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Relay (one pod and two pods on one Redis), the reference Django Channels app it replaces "
        "(`loadtest/peers/refapp`: the original sync consumer on channels_redis's core layer under daphne), "
        "the strongest Django configuration for the same app (an async consumer on RedisPubSubChannelLayer "
        "under uvicorn, one worker process as relay has one), and the Python limit "
        "(`loadtest/peers/minimal.py`: the seed protocol on asyncio + uvloop alone), measured side by side "
        "in one run of `make bench` with the same load generator (`loadtest/engine.py`) on loopback.",
        "",
        f"**Taken on a 2-core machine shared with other work**, with the load generator on the same "
        f"cores, so absolute numbers are noisy; ratios measured in the same run are the meaningful part. "
        f"One run took {results['seconds'] / 60:.1f} minutes. A ramp step that fails is repeated and "
        "passes on 2 of 3 tries; the broadcast times are medians of 5 broadcasts.",
        "",
        "## Machine and command",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items()],
        "",
        "```",
        "make bench    # = ulimit -n $(ulimit -Hn) && .venv-load/bin/python -m loadtest.bench "
        + " ".join(argv),
        "```",
        "",
    ]
    for note in results["notes"]:
        lines += [f"> **Note:** {note}", ""]
    ramps = {(r["shape"], r["target"]): r for r in results["ramps"]}
    shapes = list(dict.fromkeys(r["shape"] for r in results["ramps"]))
    idle = results["idle"]

    def max_rate(shape: str, target: str) -> float | None:
        r = ramps.get((shape, target))
        return r["max_rate"] if r else None

    ratio = one = bcast = mem = conn = "not measured"
    if shapes:
        relay, ref = max_rate(shapes[0], "relay 1 pod"), max_rate(shapes[0], "Django Channels")
        if relay is not None and ref:
            ratio = f"relay {relay:,.0f} msg/s vs reference {ref:,.0f} msg/s: **{relay / ref:.1f}x**"
        elif relay is not None:
            ratio = f"relay {relay:,.0f} msg/s; the reference sustained none of its ramp's rates"
    if len(shapes) > 1 and (r := ramps.get((shapes[1], "relay 1 pod"))):
        at50 = [s for s in r["steps"] if s["rate"] == 50 and s["summary"]["ok"]]
        p99 = at50[0]["summary"]["latency"]["p99_ms"] if at50 else None
        one = f"max sustainable {r['max_rate']:g} msg/s; p99 at 50 msg/s {_fmt(p99, ' ms', 1)}"
    if (i := idle.get("relay 1 pod")) is not None:
        bcast = f"median {_fmt(i['last_member_s_median'] and i['last_member_s_median'] * 1000, ' ms', 1)}"
        bcast += f" to the last of {i['connections']:,}"
        mem = f"{i['kib_per_connection']:.1f} KiB"
        conn = f"{i['connect_per_s']:,.0f} connections/s"
    lines += ["## Against the targets (one pod on Redis)", "", TARGETS_TEXT.format(**locals()), ""]
    lines += limit_ratios(results)
    lines += [
        "## Maximum sustainable publish rate",
        "",
        "Ramped in fixed steps until p99 > 100 ms, any loss, or a saturated generator; a step that fails is "
        "run twice more and passes on 2 of 3 (one noisy pass must not end a ramp). The table gives the "
        "last good step and what limited the first bad one (CPU shares are of one core, during that step).",
        "",
        "| shape | target | max msg/s | deliveries/s | p50 / p99 / p99.9 ms at max "
        "| server CPU µs per delivery | limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["ramps"]:
        good = [s for s in r["steps"] if s["rate"] == r["max_rate"] and s["summary"]["ok"]]
        if good:
            s = good[0]
            lat = s["summary"]["latency"]
            cells = (
                f"{s['summary']['delivered_per_s']:,.0f} | {lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} / "
                f"{lat['p999_ms']:.1f} | {s['server_cpu_us_per_delivery']:.1f}"
            )
        else:
            cells = "- | - | -"
        lines.append(f"| {r['shape']} | {r['target']} | {r['max_rate']:,g} | {cells} | {r['limit']} |")
    lines += ["", *[f"![latency]({os.path.join('plots', f)})" for f in files], ""]
    lines += ["### Every step", ""]
    lines += [
        "| shape | target | msg/s | deliveries/s | p50 | p99 | p99.9 | max | lost | server CPU | Redis CPU "
        "| generator CPU | machine CPU (of 200%) | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["ramps"]:
        for s in r["steps"]:
            sm, lat = s["summary"], s["summary"]["latency"]
            lines.append(
                f"| {r['shape']} | {r['target']} | {s['rate']:g}{_attempt(s)} | "
                f"{sm['delivered_per_s']:,.0f} | "
                f"{lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['p999_ms']:.1f} | {lat['max_ms']:.1f} | "
                f"{sm['accounting']['lost']} | {sum(s['server_cpu_share'].values()):.0%} | "
                f"{s['redis_cpu_share']:.0%} | {sm['generator']['cpu_share_per_process'][0]:.0%} | "
                f"{s['machine_cpu_share']:.0%} | {'yes' if sm['ok'] else 'no'} |"
            )
    lines += [
        "",
        "## Idle connections, memory and one broadcast",
        "",
        "| target | connections | connect/s | server RSS before -> after | KiB per connection "
        "(on a fresh server) | broadcast: median / last member (median of runs) | complete broadcasts |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, i in idle.items():
        last = i["last_member_s_median"]
        med = i["median_member_s_median"]
        lines.append(
            f"| {name} | {i['connections']:,} ({i['connect_errors']} errors) | {i['connect_per_s']:,.0f} | "
            f"{i['rss_before_mib']:.0f} -> {i['rss_after_mib']:.0f} MiB | {i['kib_per_connection']:.1f} "
            f"({_fresh(results, name)}) | "
            f"{_fmt(med and med * 1000, ' ms', 1)} / {_fmt(last and last * 1000, ' ms', 1)} | "
            f"{i['complete_broadcasts']}/{len(i['broadcasts'])} |"
        )
    lines += [""]
    extra = os.path.join(docs, "benchmarks-findings.md")
    if os.path.exists(extra):
        with open(extra) as f:
            lines += [f.read()]
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


LIMIT = "Python limit"


def limit_ratios(results: dict[str, Any]) -> list[str]:
    """relay (one pod) as a ratio to the minimal asyncio + uvloop server, measured in the same run."""
    ramps = {(r["shape"], r["target"]): r for r in results["ramps"]}
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in results["ramps"]):
        ours, limit = ramps.get((shape, "relay 1 pod")), ramps.get((shape, LIMIT))
        if ours and limit and limit["max_rate"]:
            rows.append(f"| max msg/s, {shape} | {ours['max_rate']:,g} | {limit['max_rate']:,g} | "
                        f"{ours['max_rate'] / limit['max_rate']:.2f}x |")  # fmt: skip
            mine, best = _cpu_at_max(ours), _cpu_at_max(limit)
            if mine and best:
                label = f"server CPU µs per delivery at its max, {shape}"
                rows.append(f"| {label} | {mine:.1f} | {best:.1f} | {mine / best:.2f}x |")
    ours_idle, limit_idle = results["idle"].get("relay 1 pod"), results["idle"].get(LIMIT)
    if ours_idle and limit_idle:
        figures = (
            ("KiB per idle connection", "kib_per_connection", 1.0),
            ("connections per second", "connect_per_s", 1.0),
            ("broadcast to the last member, ms", "last_member_s_median", 1000.0),
        )
        for label, key, unit in figures:
            a, b = ours_idle.get(key), limit_idle.get(key)
            if a and b:
                rows.append(f"| {label} | {a * unit:,.1f} | {b * unit:,.1f} | {a / b:.2f}x |")
    if not rows:
        return []
    return [
        "## relay against the Python limit",
        "",
        "The minimal server (`loadtest/peers/minimal.py`: the seed protocol on asyncio + uvloop alone, no "
        "framework, Redis, limits or metrics) in the same run; relay's figures as a ratio to it.",
        "",
        "| figure | relay 1 pod | Python limit | relay / limit |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def _cpu_at_max(ramp: dict[str, Any]) -> float | None:
    good = [s for s in ramp["steps"] if s["rate"] == ramp["max_rate"] and s["summary"]["ok"]]
    return float(good[0]["server_cpu_us_per_delivery"]) if good else None


def _fresh(results: dict[str, Any], name: str) -> str:
    fresh = results.get("idle_fresh", {}).get(name)
    return f"{fresh['kib_per_connection']:.1f}" if fresh else "-"


def _attempt(step: dict[str, Any]) -> str:
    return f" (try {step['attempt']})" if step.get("attempt", 1) > 1 else ""


def _median_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One step per rate for the plots: the attempt with the median p99 where a step was repeated."""
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for step in steps:
        by_rate.setdefault(step["rate"], []).append(step)
    return [
        sorted(tries, key=lambda s: s["summary"]["latency"]["p99_ms"])[len(tries) // 2]
        for _, tries in sorted(by_rate.items())
    ]
