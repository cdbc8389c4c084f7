"""The arithmetic and tables of `loadtest.history_cost`: medians, ratios on/off, Markdown.

Pure functions over the raw step records, so the unit tests check them without processes.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

P99_MS = 100.0
ARMS = ("off", "on")


def _others(used: Mapping[str, float], generator: float) -> float:
    """CPU seconds of everything else on the machine (other users' jobs): it takes cores from
    the pod, Redis and the generator alike."""
    return max(0.0, used["machine"] - sum(v for k, v in used.items() if k != "machine") - generator)


def step_record(
    arm: str,
    rate: float,
    seconds: float,
    summary: Mapping[str, Any],
    used: Mapping[str, float],
    publishing: Mapping[str, float],
    wall: float,
    generator: float,
    generator_publishing: float,
) -> dict[str, Any]:
    """One step's record: the engine's `summary`, and CPU seconds by "pod off", "pod on", "redis
    off", "redis on" and the whole "machine", over the step (`used`, drain included; `generator`:
    this process) and over its first `seconds`, while publishing (`publishing`). Per message and per
    delivery come from the whole step (catching up is part of the cost); shares of a core from the
    publishing time, so a pod saturated while messages came in shows as such."""
    other = next(a for a in ARMS if a != arm)
    pod, redis = used[f"pod {arm}"], used[f"redis {arm}"]
    sent, got = max(1, summary["published"]), max(1, summary["deliveries"])
    lat, acc = summary["latency"], summary["accounting"]
    return {
        "arm": arm,
        "rate": rate,
        "seconds": seconds,
        "wall_s": round(wall, 3),
        "published": summary["published"],
        "deliveries": summary["deliveries"],
        "lost": acc["lost"],
        "duplicates": acc["duplicates"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "pod_cpu_s": pod,
        "redis_cpu_s": redis,
        "idle_pod_cpu_s": used[f"pod {other}"],  # the other arm's pod, idle: the noise floor
        "machine_cpu_s": round(used["machine"], 2),
        "pod_us_per_message": round(pod / sent * 1e6, 2),
        "pod_us_per_delivery": round(pod / got * 1e6, 3),
        "redis_us_per_message": round(redis / sent * 1e6, 2),
        "pod_cpu_share": round(publishing[f"pod {arm}"] / seconds, 3),
        "redis_cpu_share": round(publishing[f"redis {arm}"] / seconds, 3),
        "generator_cpu_share": round(generator_publishing / seconds, 3),
        "machine_cpu_share": round(publishing["machine"] / seconds, 3),
        "others_cpu_share": round(_others(publishing, generator_publishing) / seconds, 3),
        "others_cpu_share_whole_step": round(_others(used, generator) / wall, 3),
        "generator_saturated": summary["generator"]["saturated"],
        "slo_violations": summary["slo_violations"],
        "ok": bool(summary["ok"]),
    }


def bottleneck(step: dict[str, Any]) -> str:
    """Who limited a step that failed. Other processes' share of the machine comes first: on a
    2-core machine they take cores from the pod, Redis and the generator alike."""
    if step.get("others_cpu_share", 0.0) >= 0.3:
        return f"other processes on the machine used {step['others_cpu_share']:.0%} of a core"
    if step["generator_saturated"]:
        return "load generator: " + "; ".join(step["generator_saturated"])
    if step["pod_cpu_share"] >= 0.9:
        return f"the pod at {step['pod_cpu_share']:.0%} of a core"
    if step["redis_cpu_share"] >= 0.9:
        return f"Redis at {step['redis_cpu_share']:.0%} of a core"
    if step["machine_cpu_share"] >= 1.8:
        return f"the machine: {step['machine_cpu_share']:.0%} of 2 cores busy"
    why = "loss" if step["lost"] else "latency"
    return f"{why} with the pod at {step['pod_cpu_share']:.0%} of a core (queueing, not CPU)"


STEADY_METRICS = (
    "pod_us_per_message",
    "pod_us_per_delivery",
    "redis_us_per_message",
    "p50_ms",
    "p99_ms",
    "pod_cpu_share",
    "redis_cpu_share",
    "others_cpu_share",
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(steady_steps: list[dict[str, Any]], ramp_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each arm's rounds and median, the ratio on/off of the medians and per round.
    Void steps (disturbed by other processes, and run again) count for nothing."""
    void = sum(1 for s in steady_steps if s.get("void"))
    void += sum(1 for r in ramp_results for s in r.get("steps", []) if s.get("void"))
    steady_steps = [s for s in steady_steps if not s.get("void")]
    out: dict[str, Any] = {"void_steps": void}
    series: dict[str, dict[str, dict[int, float]]] = {}
    for metric in STEADY_METRICS:
        series[metric] = {a: {s["round"]: s[metric] for s in steady_steps if s["arm"] == a} for a in ARMS}
    series["max_rate"] = {a: {r["round"]: r["max_rate"] for r in ramp_results if r["arm"] == a} for a in ARMS}
    for metric, per_arm in series.items():
        row: dict[str, Any] = {}
        for arm in ARMS:
            row[arm] = list(per_arm[arm].values())
            row[f"{arm}_median"] = round(_median(row[arm]), 3)
        off, on = row["off_median"], row["on_median"]
        row["ratio_on_off"] = round(on / off, 2) if off else None
        row["ratio_on_off_per_round"] = [
            round(v / per_arm["off"][r], 2) for r, v in per_arm["on"].items() if per_arm["off"].get(r)
        ]
        out[metric] = row
    out["all_steady_steps_ok"] = all(s["ok"] for s in steady_steps)
    out["limits"] = {a: [r["limit"] for r in ramp_results if r["arm"] == a] for a in ARMS}
    return out


def markdown(
    summary: Mapping[str, Any],
    memory: list[dict[str, Any]],
    redis_cpu: list[dict[str, Any]],
    config: Mapping[str, Any],
) -> str:
    """The tables docs quote: cost per message, Redis memory and Redis CPU for history."""
    fanout = config["subscribers"] // config["groups"]
    label = {
        "pod_us_per_message": "pod CPU per message (µs)",
        "pod_us_per_delivery": f"pod CPU per delivery (µs; {fanout} per message)",
        "redis_us_per_message": "redis-server CPU per message (µs)",
        "p50_ms": "delivery latency p50 (ms)",
        "p99_ms": "delivery latency p99 (ms)",
        "max_rate": f"max publish rate at p99 <= {P99_MS:.0f} ms (msg/s)",
    }
    rate = f"{config['rate']:,.0f} msg/s"
    out = [
        f"| {config['subscribers']:,} subscribers in {config['groups']} groups, one pod | history off | "
        f"history on (history = {config['history']}) | on / off (per round) |",
        "|---|---|---|---|",
    ]
    for metric, text in label.items():
        row = summary[metric]
        spread = row["ratio_on_off_per_round"]
        rounds = f" ({min(spread):.2f}-{max(spread):.2f})" if spread else ""
        ratio = f"**{row['ratio_on_off']:.2f}x**{rounds}" if row["ratio_on_off"] is not None else "-"
        where = "" if metric == "max_rate" else f" at {rate}"
        fmt = "{:,.0f}" if metric == "max_rate" else "{:.2f}" if metric.endswith("ms") else "{:.1f}"
        out.append(
            f"| {text}{where} | {fmt.format(row['off_median'])} | {fmt.format(row['on_median'])} | {ratio} |"
        )
    out += [
        "",
        "| Redis memory, history on | messages per group | bytes per group | stream bytes per message "
        "| idempotency bytes per key | idempotency share |",
        "|---|---|---|---|---|---|",
    ]
    for row in memory:
        if row["arm"] != "on":
            continue
        out.append(
            f"| {row['groups']} groups, {row['frame_bytes']}-byte frames | {row['messages_per_group']:,} "
            f"| {row['bytes_per_group_median']:,} | {row['stream_bytes_per_entry_median']:.0f} "
            f"| {row['idempotency_bytes_per_key_median']:.0f} | {row['idempotency_share_median']:.0%} |"
        )
    off = [r for r in memory if r["arm"] == "off"]
    if off:
        most = max(r["bytes_per_group_median"] for r in off)
        out.append(f"\nHistory off, the same messages: {most:,} bytes per group stored.")
    out += [
        "",
        "| redis-server CPU per message, pipelined, no subscribers | µs | vs PUBLISH "
        "| messages per Redis CPU-second |",
        "|---|---|---|---|",
    ]
    names = {
        "publish": "PUBLISH (history off)",
        "append": "APPEND script (history on, as relay publishes)",
        "append without key": "APPEND script without an idempotency key (what-if)",
    }
    for row in redis_cpu:
        rate, ratio = row["messages_per_redis_cpu_second"], row["ratio_to_publish"]
        out.append(
            f"| {names.get(row['variant'], row['variant'])} | {row['redis_us_per_message_median']:.1f} "
            f"| {'-' if ratio is None else f'{ratio}x'} | {'-' if rate is None else f'{rate:,}'} |"
        )
    return "\n".join(out)
