"""Why the load generators keep loadtest.stats.Histogram rather than HdrHistogram: measured.

Both keep latencies with a bounded relative error and merge across workers. The generators record
one value per delivery, on the hot path of a process that is itself measured for saturation, so
what matters is the CPU per record(), then the size of a snapshot shipped to the Locust master, the
cost of merging, and the accuracy of the percentiles. Same values for both, side by side, in one run:

    .venv-load/bin/python -m loadtest.histogram_cost --json docs/results/histogram-cost.json

HdrHistogram here is the maintained Python port on PyPI (`hdrhistogram`, HdrHistogram_py; its
counts array and encoder are in C), configured as the generators need: 1 us to 60 s, 3 significant
digits (0.1%, as loadtest.stats keeps).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtest.stats import Histogram

N = 200_000
ROUNDS = 7
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def latencies(n: int, seed: int = 1) -> list[float]:
    """Seconds: mostly ~1-5 ms, a long tail to seconds, as deliveries under load look."""
    rng = random.Random(seed)
    return [
        rng.lognormvariate(-6.0, 0.8) + (rng.expovariate(2.0) if rng.random() < 0.01 else 0.0)
        for _ in range(n)
    ]


def per_call_ns(fn: Callable[[], None], n: int) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / n


def one_round(values: list[float]) -> dict[str, float]:
    us = [int(v * 1_000_000) for v in values]
    ours, hdr, corrected = Histogram(), HdrHistogram(1, 60_000_000, 3), HdrHistogram(1, 60_000_000, 3)

    def record_ours() -> None:
        record = ours.record
        for v in values:
            record(v)

    def record_hdr() -> None:
        record = hdr.record_value
        for v in values:
            record(int(v * 1_000_000))

    def record_corrected() -> None:  # coordinated-omission correction for an expected 1 ms interval
        record = corrected.record_corrected_value
        for v in values:
            record(int(v * 1_000_000), 1000)

    row = {
        "record_ns_ours": per_call_ns(record_ours, len(values)),
        "record_ns_hdr": per_call_ns(record_hdr, len(values)),
        "record_ns_hdr_corrected": per_call_ns(record_corrected, len(values)),
    }
    ours_blob = json.dumps(ours.to_dict()).encode()
    hdr_blob = hdr.encode()
    row["snapshot_bytes_ours"] = len(ours_blob)
    row["snapshot_bytes_hdr"] = len(hdr_blob)
    start = time.perf_counter_ns()
    merged = Histogram.from_dict(json.loads(ours_blob))
    merged.merge(ours)
    row["merge_us_ours"] = (time.perf_counter_ns() - start) / 1000
    start = time.perf_counter_ns()
    other = HdrHistogram.decode(hdr_blob)
    other.add(hdr)
    row["merge_us_hdr"] = (time.perf_counter_ns() - start) / 1000
    exact = sorted(us)
    for q in PERCENTILES:
        truth = exact[max(0, int(len(exact) * q / 100 + 0.999999) - 1)]
        row[f"p{q:g}_error_ours"] = abs(ours.percentile(q) * 1000 - truth) / truth
        row[f"p{q:g}_error_hdr"] = abs(hdr.get_value_at_percentile(q) - truth) / truth
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=int, default=N)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--json", default="")
    args = p.parse_args()
    values = latencies(args.values)
    rows = [one_round(values) for _ in range(args.rounds)]
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    ratio = medians["record_ns_hdr"] / medians["record_ns_ours"]
    print(f"{'':28} {'ours':>12} {'HdrHistogram':>14}")
    print(f"{'ns per record (median)':28} {medians['record_ns_ours']:12.0f} {medians['record_ns_hdr']:14.0f}")
    print(f"{'  with CO correction':28} {'':12} {medians['record_ns_hdr_corrected']:14.0f}")
    print(
        f"{'snapshot bytes':28} {medians['snapshot_bytes_ours']:12.0f} {medians['snapshot_bytes_hdr']:14.0f}"
    )
    print(f"{'decode+merge us':28} {medians['merge_us_ours']:12.0f} {medians['merge_us_hdr']:14.0f}")
    for q in PERCENTILES:
        ours_err, hdr_err = medians[f"p{q:g}_error_ours"], medians[f"p{q:g}_error_hdr"]
        print(f"{f'p{q:g} relative error':28} {ours_err:12.5f} {hdr_err:14.5f}")
    print(f"HdrHistogram record() costs {ratio:.2f}x ours")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False)
        result: dict[str, Any] = {
            "command": " ".join([".venv-load/bin/python -m loadtest.histogram_cost", *sys.argv[1:]]),
            "git_commit": commit.stdout.strip(),
            "git_dirty_files": [line[3:] for line in dirty.stdout.splitlines()],
            "versions": {"python": platform.python_version(), "hdrhistogram": version("hdrhistogram")},
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "values_per_round": args.values,
            "medians": medians,
            "hdr_record_over_ours": ratio,
            "rounds": rows,
        }
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
