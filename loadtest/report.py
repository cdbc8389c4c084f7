"""docs/benchmarks.md, docs/benchmarks.json and docs/plots/*.png from the runs of `loadtest.bench`."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any


def _fmt(x: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}{unit}"


def plots(results: dict[str, Any], plot_dir: str, suffix: str = "") -> list[str]:
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
        name = f"latency-{i + 1}-{shape.split(' in ')[-1].replace(' ', '-')}{suffix}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


INTRO = (
    "Relay (one pod and two pods on one Redis), the reference Django Channels app it replaces "
    "(`loadtest/peers/refapp`: the original sync consumer on channels_redis's core layer under daphne), "
    "the strongest Django configuration for the same app (an async consumer on RedisPubSubChannelLayer "
    "under uvicorn, one worker process as relay has one), and the Python limit "
    "(`loadtest/peers/minimal.py`: the seed protocol on asyncio + uvloop alone), measured side by side "
    "with the same load generator (`loadtest/engine.py`) on loopback, in whole runs one after the other."
)


def figures(run: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures of one run (None where not measured)."""
    ramps = {(r["shape"], r["target"]): r for r in run["ramps"]}
    shapes = list(dict.fromkeys(r["shape"] for r in run["ramps"]))

    def max_rate(shape: int, target: str) -> float | None:
        r = ramps.get((shapes[shape], target)) if len(shapes) > shape else None
        return float(r["max_rate"]) if r else None

    out: dict[str, float | None] = {
        f"max msg/s, {shapes[0] if shapes else '100 groups'}: {t}": max_rate(0, t)
        for t in ("relay 1 pod", "relay 2 pods", "Django Channels", "Django async pubsub", LIMIT)
    }
    for t in ("relay 1 pod", "Django Channels", "Django async pubsub", LIMIT):
        r = ramps.get((shapes[0], t)) if shapes else None
        out[f"server CPU µs per delivery at its max, {shapes[0] if shapes else ''}: {t}"] = (
            _cpu_at_max(r) if r else None
        )
    one = ramps.get((shapes[1], "relay 1 pod")) if len(shapes) > 1 else None
    at50 = [s for s in one["steps"] if s["rate"] == 50 and s["summary"]["ok"]] if one else []
    out["one group: relay 1 pod max msg/s"] = float(one["max_rate"]) if one else None
    out[f"one group: {LIMIT} max msg/s"] = max_rate(1, LIMIT)
    out["one group: relay 1 pod p99 at 50 msg/s (ms)"] = (
        at50[0]["summary"]["latency"]["p99_ms"] if at50 else None
    )
    for name in ("relay 1 pod", LIMIT):
        i, fresh = run["idle"].get(name), run.get("idle_fresh", {}).get(name)
        last = i and i["last_member_s_median"]
        out[f"{name}: broadcast to the last idle member (ms)"] = last * 1000 if last else None
        out[f"{name}: KiB per idle connection, fresh"] = fresh["kib_per_connection"] if fresh else None
        out[f"{name}: KiB per idle connection, after load"] = i["kib_per_connection"] if i else None
        out[f"{name}: new connections/s"] = i["connect_per_s"] if i else None
    return out


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    per_run = [figures(r) for r in runs]
    out: dict[str, float | None] = {}
    for key in per_run[0]:
        values = [value for f in per_run if (value := f[key]) is not None]
        out[key] = statistics.median(values) if values else None
    return out


# Issue 17's targets: (label, relay's figure, the Python limit's, most relay / limit, or an absolute
# ceiling ("<=") / floor (">=") relay must reach on its own). A target with both is met by either.
TARGETS: tuple[tuple[str, str, float | None, str, float | None], ...] = (
    ("server CPU µs per delivery at its max, 1,000 in 100 groups", "cpu", 1.3, "", None),
    ("broadcast to the last of 5,000 members (ms)", "broadcast", 1.2, "<=", 50.0),
    ("KiB per idle connection, fresh pod, 10,000 connections", "fresh", None, "<=", 12.0),
    ("new connections/s (limit / relay)", "connect", None, ">=", 3000.0),
    ("max msg/s, 1,000 in one group (limit / relay)", "one", 1.5, "", None),
)


def _target_keys(med: dict[str, float | None], what: str) -> tuple[str, str]:
    """The keys of relay's and the Python limit's figure for one target."""
    if what == "cpu":
        key = next((k for k in med if k.startswith("server CPU") and k.endswith(": relay 1 pod")), "")
    else:
        key = {
            "broadcast": "relay 1 pod: broadcast to the last idle member (ms)",
            "fresh": "relay 1 pod: KiB per idle connection, fresh",
            "connect": "relay 1 pod: new connections/s",
            "one": "one group: relay 1 pod max msg/s",
        }[what]
    return key, key.replace("relay 1 pod", LIMIT)


def targets(med: dict[str, float | None], runs: list[dict[str, Any]]) -> list[str]:
    """Issue 17's targets against the medians: relay, the Python limit, their ratio, met or not."""
    lines = [
        "## Targets: relay against the Python limit",
        "",
        "The targets relay holds itself to (issue 17), from the medians above; a ratio is relay's figure "
        "over the Python limit's, except for rates (the limit's over relay's), so above 1 is always "
        "relay's cost.",
        "",
        "| figure | relay 1 pod | Python limit | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, what, most, sign, bound in TARGETS:
        mine, theirs = (med.get(k) for k in _target_keys(med, what))
        ratio = None
        if mine and theirs:
            ratio = theirs / mine if what in ("one", "connect") else mine / theirs
        wanted = []
        met = False
        if most is not None:
            wanted.append(f"<= {most}x")
            met = met or (ratio is not None and ratio <= most)
        if bound is not None:
            wanted.append(f"{sign} {bound:,g}")
            if mine is not None:
                met = met or (mine <= bound if sign == "<=" else mine >= bound)
        ratio_cell = f"{ratio:.2f}x" if ratio is not None else "n/a"
        verdict = "yes" if met else "**no**"
        lines.append(
            f"| {label} | {_fmt(mine, digits=1)} | {_fmt(theirs, digits=1)} | {ratio_cell} | "
            f"{' or '.join(wanted)} | {verdict} |"
        )
    stops = [
        f"run {run['run']}, {r['target']} after {r['max_rate']:g} msg/s: {r['limit']}"
        for run in runs
        for r in run["ramps"]
        if r["target"] in ("relay 1 pod", LIMIT) and r["shape"].endswith(" 1 groups")
    ]
    if stops:
        lines += ["", "What stopped the one-group ramps:", "", *[f"- {x}" for x in stops]]
    return [*lines, ""]


def headline(runs: list[dict[str, Any]]) -> list[str]:
    """Every figure per run and its median; ratios are of the medians, so a cell agrees with its operands."""
    per_run, med = [figures(r) for r in runs], medians(runs)
    head = " | ".join(f"run {r['run']}" for r in runs)
    lines = [f"| figure | {head} | median |", "|---|" + "---:|" * (len(runs) + 1)]
    for key in med:
        if all(f[key] is None for f in per_run):
            continue  # a target this run left out (--only)
        cells = " | ".join(_fmt(f[key], digits=1) for f in per_run)
        lines.append(f"| {key} | {cells} | **{_fmt(med[key], digits=1)}** |")
    relay = next((k for k in med if k.endswith(": relay 1 pod") and k.startswith("max")), "")
    lines += ["", "| ratio of medians | value |", "|---|---:|"]
    for other in ("Django Channels", "Django async pubsub", LIMIT):
        key = relay.replace("relay 1 pod", other)
        a, b = med.get(relay), med.get(key)
        if a and b:
            lines.append(f"| relay 1 pod / {other}, max msg/s ({_fmt(a)} / {_fmt(b)}) | **{a / b:.2f}x** |")
    return [*lines, ""]


README_START, README_END = "<!-- make bench: start -->", "<!-- make bench: end -->"


def readme_block(med: dict[str, float | None], runs: list[dict[str, Any]]) -> str:
    """The README's headline bullet, from the medians in docs/benchmarks.json (a test checks it is)."""
    commit = runs[0]["git_commit"]
    fresh = runs[0].get("idle_fresh", {}).get("relay 1 pod", {}).get("connections", 0)
    groups = next((k for k in med if k.startswith("max msg/s,") and k.endswith(": relay 1 pod")), "")
    relay = med.get(groups) or 0.0

    def times(other: str) -> str:
        them = med.get(groups.replace("relay 1 pod", other))
        return f"{relay / them:.1f}x" if relay and them else "n/a"

    def fig(key: str, digits: int = 0) -> str:
        return _fmt(med.get(key), digits=digits)

    cpu = groups.replace("max msg/s", "server CPU µs per delivery at its max")
    ours, limit = med.get(cpu), med.get(cpu.replace("relay 1 pod", LIMIT))
    per_delivery = f"{ours / limit:.1f}x" if ours and limit else "n/a"
    versus_async = (
        f"{times('Django async pubsub')} the best async Django configuration"
        if med.get(groups.replace("relay 1 pod", "Django async pubsub"))
        else "while the best async Django configuration held none of its steps (median maximum 0)"
    )

    return "\n".join(
        [
            README_START,
            f"- Fast on a 2-core machine, one pod on Redis (medians of {len(runs)} runs of `make bench` at "
            f"{commit[:7]}, [docs/benchmarks.md](docs/benchmarks.md)):",
            f"  {_fmt(relay)} messages/s to 1,000 subscribers in 100 groups: {times('Django Channels')} the "
            f"Django Channels app it replaces, {versus_async}; {fig(cpu, 1)} µs of server CPU per "
            f"delivery there, {per_delivery} the "
            f"Python limit's {fig(cpu.replace('relay 1 pod', LIMIT), 1)} µs (asyncio + uvloop alone);",
            f"  a broadcast reaches the last of 5,000 members in "
            f"{fig('relay 1 pod: broadcast to the last idle member (ms)')} ms "
            f"({fig(LIMIT + ': broadcast to the last idle member (ms)')} ms for the Python limit); "
            f"{fig('relay 1 pod: KiB per idle connection, fresh', 1)} KiB per idle connection on a fresh "
            f"pod with {fresh:,}, {fig('relay 1 pod: new connections/s')} new connections/s.",
            README_END,
        ]
    )


def update_readme(readme: str, block: str) -> None:
    """Replace the text between the README's markers with `block`."""
    with open(readme) as f:
        text = f.read()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not (start and end):
        raise SystemExit(f"{readme} lacks the markers {README_START} ... {README_END}")
    with open(readme, "w") as f:
        f.write(head + block + tail)


def write_report(runs: list[dict[str, Any]], out: str, argv: Sequence[str] = ()) -> None:
    docs = os.path.dirname(out)
    first = runs[0]
    med = medians(runs)
    with open(os.path.join(docs, "benchmarks.json"), "w") as f:
        json.dump({"medians": med, "runs": runs}, f, indent=1, default=str)
    readme = os.path.join(os.path.dirname(docs), "README.md")
    if os.path.exists(readme):
        update_readme(readme, readme_block(med, runs))
    lines = [
        "# Benchmarks",
        "",
        INTRO,
        "",
        f"**Taken on a 2-core machine shared with other work**, with the load generator on the same "
        f"cores, so absolute numbers are noisy: quote medians over the {len(runs)} runs and ratios of "
        f"them. A run took {statistics.median(r['seconds'] for r in runs) / 60:.1f} minutes. A ramp step "
        "that fails is repeated and passes on 2 of 3 tries; the broadcast times are medians of 5 broadcasts. "
        "Every server of a run stays up through it, so each shape starts only once all of them use "
        "under 5% of a core (the wait is `settle_s` in the raw results). "
        "Raw results of each run: `docs/results/bench/run-*.json`.",
        "",
        "## Machine, command, commit and versions",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in first["machine"].items() if k not in ("relay commit", "python")],
        f"| commit | {first['git_commit']}{' (uncommitted changes!)' if first['git_dirty_files'] else ''} |",
        *[f"| {k} | {v} |" for k, v in first["versions"].items()],
        "",
        "```",
        "ulimit -n $(ulimit -Hn) && " + first["command"].split("# = ", 1)[-1],
        "```",
        "",
        "## Headline figures, per run and their medians",
        "",
        *headline(runs),
        *targets(med, runs),
    ]
    for results in runs:
        lines += [f"## Run {results['run']}", ""]
        lines += _run_sections(results, os.path.join(docs, "plots"))
    extra = os.path.join(docs, "benchmarks-findings.md")
    if os.path.exists(extra):
        with open(extra) as f:
            lines += [f.read()]
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def _run_sections(results: dict[str, Any], plot_dir: str) -> list[str]:
    """One run's tables: the ramps' maxima and every step, its plots, and the idle shapes."""
    files = plots(results, plot_dir, suffix=f"-run{results['run']}")
    lines: list[str] = []
    for note in results["notes"]:
        lines += [f"> **Note:** {note}", ""]
    idle = results["idle"]
    lines += limit_ratios(results)
    lines += [
        "### Maximum sustainable publish rate",
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
    lines += ["#### Every step", ""]
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
        "### Idle connections, memory and one broadcast",
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
    return [*lines, ""]


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
        "### relay against the Python limit",
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
    return f"{fresh['kib_per_connection']:.1f} at {fresh['connections']:,}" if fresh else "-"


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
