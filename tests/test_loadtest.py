"""The load tooling: its bookkeeping (unit) and the smoke profile against a real pod (integration).

The smoke run catches a collapse (nothing delivered, loss, reordering, a generator that cannot keep
up with 20 messages per second); the targets live in `make bench`, not here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.servers import Servers, tree
from loadtest.stats import (
    DUPLICATE,
    IN_ORDER,
    LATE,
    Histogram,
    Ledger,
    Slo,
    Stream,
    judge_generators,
    summarize,
)
from tests.helpers import ROOT, PodProcess, free_port, scrape, start_pod_process, wait_until

LOAD_PYTHON = Path(ROOT, ".venv-load", "bin", "python")


# --- Histogram -------------------------------------------------------------------------------------


def test_histogram_is_exact_below_two_milliseconds() -> None:
    h = Histogram()
    for us in range(1, 1001):  # 1 us .. 1000 us
        h.record(us / 1_000_000)
    assert h.percentile(50) == pytest.approx(0.5)
    assert h.percentile(99) == pytest.approx(0.99)
    assert h.percentile(99.9) == pytest.approx(0.999)
    assert h.percentile(100) == pytest.approx(1.0)
    assert h.min_us == 1 and h.n == 1000


def test_histogram_keeps_large_values_within_a_thousandth() -> None:
    h = Histogram()
    for ms in (3.3, 47.0, 99.9, 1234.5, 60_000.0):
        h.record(ms / 1000)
    for q, want in ((20, 3.3), (40, 47.0), (60, 99.9), (80, 1234.5)):
        assert h.percentile(q) == pytest.approx(want, rel=1e-3)
    assert h.percentile(100) == 60_000.0


def test_histogram_merge_equals_recording_everything_in_one() -> None:
    values = [i * 0.000731 for i in range(2000)]
    one, a, b = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        one.record(v)
        (a if i % 3 else b).record(v)
    merged = Histogram.from_dict(json.loads(json.dumps(a.to_dict())))
    merged.merge(Histogram.from_dict(b.to_dict()))
    assert merged.summary() == one.summary()


def test_negative_latency_is_clamped_and_empty_histogram_reads_zero() -> None:
    h = Histogram()
    assert h.percentile(99) == 0.0
    h.record(-0.001)
    assert h.max_us == 0 and h.n == 1


# --- Streams and the ledger ------------------------------------------------------------------------


def test_stream_says_what_each_message_was_for_locusts_events() -> None:
    s = Stream(0)
    assert [s.see(q) for q in (1, 2, 5, 3, 3, 6)] == [IN_ORDER, IN_ORDER, 2, LATE, DUPLICATE, IN_ORDER]
    r = Ledger().receiver("r", "g", 0.0)
    assert [r.see("p", 7), r.see("p", 9), r.see("p", 6)] == [IN_ORDER, 1, LATE]


def test_stream_counts_holes_late_arrivals_and_duplicates() -> None:
    s = Stream(0)
    for seq in (1, 2, 5, 3, 3, 6, 4, 6):
        s.see(seq)
    assert (s.first, s.top, s.unique) == (0, 6, 7)
    assert s.missing == 0  # 3 and 4 came late: holes filled
    assert s.reorders == 2 and s.dups == 2


def test_stream_below_its_first_sequence_is_late_and_opens_holes() -> None:
    s = Stream(5)
    s.see(2)
    assert s.first == 2 and s.missing == 2 and s.reorders == 1  # 3 and 4 still missing


def test_a_huge_gap_is_counted_not_listed() -> None:
    s = Stream(0)
    s.see(10_000_000)
    assert s.missing == 10_000_000 - 1
    assert s.holes is not None and len(s.holes) <= 100_000


def test_a_whole_member_owes_every_message_including_streams_it_never_saw() -> None:
    ledger = Ledger()
    for _ in range(10):
        ledger.sending("p1", "g", now=100.0)
    for _ in range(4):
        ledger.sending("p2", "g", now=100.0)
    ledger.sending("p2", "other", now=100.0)
    r = ledger.receiver("r1", "g", joined=50.0)
    for seq in (0, 1, 2, 4, 5, 6, 7, 8, 9, 9):  # 3 lost, 9 twice; nothing at all from p2
        r.see("p1", seq)
    acc = ledger.accounting()
    assert acc["expected"] == 14 and acc["unique"] == 9
    assert acc["lost"] == 1 + 4 and acc["duplicates"] == 1


def test_a_member_that_came_late_is_held_only_to_holes_in_what_it_saw() -> None:
    ledger = Ledger()
    for _ in range(10):
        ledger.sending("p", "g", now=100.0)
    late = ledger.receiver("late", "g", joined=150.0)  # joined after the first send
    for seq in (6, 8, 9):
        late.see("p", seq)
    gone = ledger.receiver("gone", "g", joined=50.0)
    gone.left = 100.5  # left before the last send plus grace
    gone.see("p", 0)
    acc = ledger.accounting(grace=2.0)
    assert acc["lost"] == 1 and acc["partial_streams"] == 2


def test_ledgers_of_two_workers_merge() -> None:
    pub, sub = Ledger(), Ledger()
    for _ in range(3):
        pub.sending("p", "g", now=10.0)
    r = sub.receiver("r", "g", joined=1.0)
    for seq in (0, 2):
        r.see("p", seq)
    merged = Ledger.merged([json.loads(json.dumps(pub.to_dict())), sub.to_dict()])
    acc = merged.accounting()
    assert (acc["expected"], acc["unique"], acc["lost"]) == (3, 2, 1)


def test_unsend_takes_back_a_publish_that_never_left() -> None:
    ledger = Ledger()
    ledger.sending("p", "g", now=1.0)
    assert ledger.sending("p", "g", now=1.0) == 1
    ledger.unsend("p", "g")
    assert ledger.sending("p", "g", now=1.0) == 1


# --- Verdicts --------------------------------------------------------------------------------------


def _health(cpu: float, lag_ms: float = 1.0, late: int = 0, sends: int = 100) -> dict[str, object]:
    lag = Histogram()
    for _ in range(100):
        lag.record(lag_ms / 1000)
    return {
        "cpu_seconds": cpu,
        "wall_seconds": 10.0,
        "lag": lag.to_dict(),
        "late_sends": late,
        "sends": sends,
    }


def test_a_saturated_generator_makes_the_run_invalid() -> None:
    assert judge_generators([_health(3.0)])["saturated"] == []
    assert "CPU" in judge_generators([_health(3.0), _health(9.5)])["saturated"][0]
    assert "lag" in judge_generators([_health(1.0, lag_ms=80)])["saturated"][0]
    assert "behind schedule" in judge_generators([_health(1.0, late=5)])["saturated"][0]


def test_summary_fails_on_a_broken_slo_and_on_an_invalid_run() -> None:
    h = Histogram()
    for ms in range(1, 201):
        h.record(ms / 1000)
    ledger = Ledger()
    ledger.sending("p", "g", now=10.0)
    ledger.receiver("r", "g", joined=1.0).see("p", 0)
    conns = {"ok": 2, "errors": 0}
    kwargs: dict[str, Any] = {"histogram": h, "ledger": ledger, "connections": conns, "seconds": 1.0}
    good = summarize(**kwargs, generators=[_health(1.0)], slo=Slo(p99_ms=250, max_loss_ratio=0))
    assert good["ok"] and good["valid"] and good["latency"]["p99_ms"] == pytest.approx(198, rel=1e-3)
    slow = summarize(**kwargs, generators=[_health(1.0)], slo=Slo(p99_ms=100))
    assert not slow["ok"] and "p99" in slow["slo_violations"][0]
    invalid = summarize(**kwargs, generators=[_health(9.8)], slo=Slo(p99_ms=250))
    assert invalid["slo_violations"] == [] and not invalid["valid"] and not invalid["ok"]


# --- Smoke: the real tools against a real pod -----------------------------------------------------


@pytest.fixture
def pod() -> Iterator[PodProcess]:
    if not LOAD_PYTHON.exists():  # a missing tool fails loudly: `make test` builds it first
        pytest.fail("the load venv is missing: `make load-venv` builds .venv-load")
    env = {"RELAY_PUBLISH_RATE": "0", "RELAY_DRAIN_DELAY": "0", "RELAY_DRAIN_WINDOW": "0.2"}
    pod = start_pod_process({**env, "RELAY_LOG_LEVEL": "WARNING"})
    assert pod.proc.poll() is None, pod.wait()
    yield pod
    pod.terminate()
    pod.wait()


def _load(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.xdist_group("load")
@pytest.mark.timeout(90)
def test_locust_smoke_profile_across_two_workers(pod: PodProcess, tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    locust = str(LOAD_PYTHON.parent / "locust")
    run = _load(
        locust, "-f", "loadtest/locustfile.py", "--headless", "--only-summary", "--processes", "2",
        "--host", f"ws://127.0.0.1:{pod.port}", "--load-profile", "smoke", "--summary-json", str(out),
        "--csv", str(tmp_path / "smoke"), timeout=80,
    )  # fmt: skip
    assert out.exists(), run.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["workers_reporting"] == 2
    # what the run measures reached Locust's own stats (and so its charts and CSV) through its events
    with open(tmp_path / "smoke_stats.csv") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    assert int(rows["WS", "deliver"]["Request Count"]) == summary["deliveries"]
    assert int(rows["GEN", "generator lag (worst per second)"]["Request Count"]) >= 2 * 10  # 2 workers, 10+ s
    assert int(rows["WS", "connect"]["Request Count"]) == 22
    assert ("WS", "lost") not in rows and ("WS", "delivery order") not in rows
    assert summary["published"] >= 100  # 20 msg/s for 6 s, open loop
    acc = summary["accounting"]
    assert acc["lost"] == 0 and acc["duplicates"] == 0 and acc["order_violations"] == 0, acc
    assert acc["unique"] >= 0.9 * summary["published"] * 5  # ~5 members per group
    assert summary["latency"]["p99_ms"] < 500
    # Locust exits 1 when any event failed: a busy machine may starve the generator for a second
    # (a GEN failure: its lag, or a late publish) in a run valid as a whole; nothing else may fail.
    failed = {
        k: row["Failure Count"]
        for k, row in rows.items()
        if k[1] != "Aggregated" and row["Failure Count"] != "0"
    }
    assert all(kind == "GEN" for kind, _ in failed), failed  # the generator's own health only
    assert run.returncode == (1 if failed else 0), run.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.xdist_group("load")
def test_engine_smoke_and_its_slo_exit_code(pod: PodProcess, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    base = [str(LOAD_PYTHON), "-m", "loadtest.engine", "--url", f"ws://127.0.0.1:{pod.port}"]
    shape = ["--subscribers", "200", "--groups", "10", "--rate", "100", "--seconds", "3"]
    run = _load(*base, *shape, "--slo-p99-ms", "500", "--slo-max-loss", "0", "--json", str(out), timeout=40)
    summary = json.loads(out.read_text())
    acc = summary["accounting"]
    assert acc["expected"] == 300 * 20 and acc["lost"] == 0, acc
    assert summary["connect_per_s"] > 100
    if summary["valid"]:
        assert run.returncode == 0, run.stderr[-2000:]
    impossible = _load(*base, *shape, "--slo-p99-ms", "0.001", timeout=40)
    assert impossible.returncode == 1 and "SLO broken: p99" in impossible.stderr


LOCUST = str(LOAD_PYTHON.parent / "locust")


@pytest.mark.integration
@pytest.mark.xdist_group("load")
def test_locust_refuses_a_run_without_a_host_or_with_other_user_counts_saying_why(pod: PodProcess) -> None:
    base = [LOCUST, "-f", "loadtest/locustfile.py", "--headless", "--only-summary", "--load-profile", "smoke"]
    no_host = _load(*base, "-t", "5", timeout=40)
    assert no_host.returncode == 2 and "no host: give --host" in no_host.stderr, no_host.stderr[-2000:]
    assert "UnboundLocalError" not in no_host.stderr
    users = _load(*base, "--host", f"ws://127.0.0.1:{pod.port}", "-u", "5", timeout=40)
    assert users.returncode == 2, users.stderr[-2000:]
    assert "the smoke profile runs 22 users (20 subscribers and 2 publishers), not 5" in users.stderr


def _ui(port: int, method: str, path: str, **form: Any) -> Any:
    response = httpx.request(method, f"http://127.0.0.1:{port}{path}", data=form or None, timeout=10)
    response.raise_for_status()
    return response.json()


def _connects(port: int) -> int:
    stats = _ui(port, "GET", "/stats/requests")["stats"]
    return sum(s["num_requests"] for s in stats if s["name"] == "connect")


@pytest.mark.integration
@pytest.mark.xdist_group("load")
@pytest.mark.timeout(120)
def test_locust_web_ui_uses_the_typed_host_and_runs_again_after_a_stop(pod: PodProcess) -> None:
    web = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    args = [LOCUST, "-f", "loadtest/locustfile.py", "--web-host", "127.0.0.1", "--web-port", str(web)]
    ui = subprocess.Popen(
        [*args, "--load-profile", "smoke"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _reachable(web), 30, "the Locust web UI")
        host = f"http://127.0.0.1:{pod.port}"  # typed as the UI suggests: taken as ws://
        for run in (1, 2):  # the second run in the same UI must connect again
            answer = _ui(web, "POST", "/swarm", user_count=22, spawn_rate=50, host=host)
            assert answer["success"], answer
            wait_until(
                lambda: _connects(web) >= 20, 30, f"run {run}: 20 subscribers connected through the UI's host"
            )
            _ui(web, "POST", "/stop")
            wait_until(
                lambda: _ui(web, "GET", "/stats/requests")["state"] == "stopped", 30, f"run {run} stopped"
            )
        opened = _opened(pod)
        _ui(web, "POST", "/swarm", user_count=5, spawn_rate=50, host=host)
        refusal = "the smoke profile runs 22 users (20 subscribers and 2 publishers), not 5"
        wait_until(lambda: refusal in json.dumps(_ui(web, "GET", "/logs")), 30, "the refusal in the UI's log")
        wait_until(
            lambda: _ui(web, "GET", "/stats/requests")["state"] == "stopped", 30, "the refused run stopped"
        )
        assert _ui(web, "GET", "/stats/requests")["user_count"] == 0
        assert _opened(pod) == opened  # refused before connecting anything
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def _opened(pod: PodProcess) -> float:
    return scrape(pod.internal_port, "relay_connections_opened_total")


def _reachable(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_histogram_cost_script_compares_both_histograms(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    run = _load(str(LOAD_PYTHON), "-m", "loadtest.histogram_cost", "--values", "2000", "--rounds", "1",
                "--json", str(out), timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    medians = json.loads(out.read_text())["medians"]
    assert medians["record_ns_ours"] > 0 and medians["record_ns_hdr"] > 0
    assert medians["p99_error_ours"] < 0.001 and medians["p99_error_hdr"] < 0.001


@pytest.mark.integration
@pytest.mark.xdist_group("load")
def test_the_minimal_server_speaks_the_seed_protocol_for_the_engine(tmp_path: Path) -> None:
    with Servers() as servers:
        minimal = servers.minimal()
        out = tmp_path / "minimal.json"
        base = [str(LOAD_PYTHON), "-m", "loadtest.engine", "--url", minimal.url]
        shape = [
            "--subscribers",
            "200",
            "--groups",
            "10",
            "--rate",
            "100",
            "--seconds",
            "3",
            "--json",
            str(out),
        ]
        run = _load(*base, *shape, timeout=40)
        assert out.exists(), run.stderr[-2000:]
        acc = json.loads(out.read_text())["accounting"]
        assert acc["expected"] == 300 * 20 and acc["lost"] == 0 and acc["duplicates"] == 0, acc


@pytest.mark.integration
@pytest.mark.xdist_group("load")
def test_the_async_django_reference_relays_for_the_engine(tmp_path: Path) -> None:
    with Servers() as servers:
        redis = servers.redis()
        django = servers.django_async(redis.url, workers=2)
        out = tmp_path / "django-async.json"
        base = [str(LOAD_PYTHON), "-m", "loadtest.engine", "--url", django.url]
        shape = [
            "--subscribers",
            "100",
            "--groups",
            "10",
            "--rate",
            "20",
            "--seconds",
            "3",
            "--json",
            str(out),
        ]
        run = _load(*base, *shape, timeout=60)
        assert out.exists(), run.stderr[-2000:]
        acc = json.loads(out.read_text())["accounting"]
        assert acc["expected"] == 60 * 10 and acc["lost"] == 0 and acc["duplicates"] == 0, acc
        assert len(tree(django.pid)) >= 3  # uvicorn's supervisor and its two workers, all charged


def _bench_run(k: int, relay: float, reference: float) -> dict[str, Any]:
    ramp = {"shape": "1000 in 100 groups", "steps": [], "limit": ""}
    ramps = [
        ramp | {"target": "relay 1 pod", "max_rate": relay},
        ramp | {"target": "Django Channels", "max_rate": reference},
    ]
    return {"run": k, "ramps": ramps, "idle": {}, "idle_fresh": {}}


def test_bench_headline_ratios_are_of_the_medians_so_cells_agree_with_their_operands() -> None:
    from loadtest.report import headline

    runs = [_bench_run(1, 10000, 250), _bench_run(2, 8000, 200), _bench_run(3, 10000, 200)]
    text = "\n".join(headline(runs))
    assert (
        "| max msg/s, 1000 in 100 groups: relay 1 pod | 10,000.0 | 8,000.0 | 10,000.0 | **10,000.0** |"
        in text
    )
    # medians 10,000 and 200: 50x (the median of the per-run ratios, 40x, would contradict them)
    assert "| relay 1 pod / Django Channels, max msg/s (10,000 / 200) | **50.00x** |" in text
    assert "Python limit" not in text  # targets a run left out get no rows


def test_the_readme_quotes_the_medians_of_the_committed_benchmark_runs() -> None:
    """README's headline numbers are the ones `make bench` wrote to docs/benchmarks.json, from the
    raw runs committed in docs/results/bench/: rerun `make bench` (or `--report-only`) to change them."""
    from loadtest.report import README_END, README_START, medians, readme_block

    root = Path(__file__).resolve().parent.parent
    committed = json.loads((root / "docs" / "benchmarks.json").read_text())
    raw = sorted((root / "docs" / "results" / "bench").glob("run-*.json"))
    runs = [json.loads(p.read_text()) for p in raw]
    assert len(runs) >= 3, "the README quotes medians of three committed runs"
    assert {r["git_commit"] for r in runs} == {runs[0]["git_commit"]}, "one commit for all runs"
    assert not any(r["git_dirty_files"] for r in runs), "runs of a clean tree only"
    assert committed["medians"] == medians(runs)
    readme = (root / "README.md").read_text()
    block = readme[readme.index(README_START) : readme.index(README_END) + len(README_END)]
    assert block == readme_block(committed["medians"], runs)
