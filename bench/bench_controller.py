#!/usr/bin/env python3
"""Controller benchmark: does the controller keep a slow replica's lag bounded, and what does it
cost when the database is healthy?

A throwaway primary and a streaming replica (pg_basebackup). The same inline backfill
(``total = qty::bigint * price`` over ``bench_t``, bigint key, default options) runs:

- ``healthy``: no controller, healthy replica (the baseline throughput);
- ``healthy+controller``: the controller polling (lag threshold T), healthy replica;
- ``slow``: no controller, the replica's replay paused in intervals (``--pause-on`` seconds
  paused, ``--pause-off`` replaying);
- ``slow+controller``: the controller, the same slow replica.

An independent sampler (its own heartbeat row written on the primary every 100 ms, read on the
replica) measures the true lag every ``--sample`` seconds; the table reports max and p95 lag,
and with ``--timeline`` the lag over time is printed. Targets: with the controller, max lag
<= 2T; healthy throughput with the controller within 10 % of without.

    .venv/bin/python bench/bench_controller.py --rows 5000000 --lag 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_engine import (  # noqa: E402
    BENCH_DB,
    EXPR,
    KINDS,
    RESULTS_DIR,
    TABLE,
    check_table,
    human,
    machine_info,
    reset_table,
)

from backfill import Backfill, JobState, update  # noqa: E402
from backfill.control.controller import Controller, ControllerConfig  # noqa: E402
from backfill.control.policy import Limit, PolicyConfig  # noqa: E402
from backfill.control.signals import Heartbeats, Replica  # noqa: E402
from backfill.core.logs import configure as configure_logs  # noqa: E402
from backfill_dev.localpg import LocalPostgres  # noqa: E402

SCENARIOS = ("healthy", "healthy+controller", "slow", "slow+controller")


@dataclass
class Sampler:
    """True replica lag, from a heartbeat of its own (independent of the controller's)."""

    dsn: str
    rdsn: str
    every_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[tuple[float, float, str]] = field(default_factory=list)
    job_id: int | None = None

    def run(self) -> None:
        # Lag as the controller defines it (Heartbeats.lag), from this sampler's own table.
        beats = Heartbeats(keep=2000)
        with psycopg.connect(self.dsn, autocommit=True) as p, \
                psycopg.connect(self.rdsn, autocommit=True) as r:
            t0 = time.monotonic()
            while not self.stop.is_set():
                row = p.execute("UPDATE bench_hb SET at = clock_timestamp() RETURNING at"
                                ).fetchone()
                assert row is not None
                beats.written.append(row[0])
                self.stop.wait(self.every_s)
                replayed = r.execute("SELECT at FROM bench_hb").fetchone()
                now_row = p.execute("SELECT clock_timestamp()").fetchone()
                assert replayed is not None
                assert now_row is not None
                lag = beats.lag(replayed[0], now_row[0]) or 0.0
                state = ""
                if self.job_id is not None:
                    st = p.execute("SELECT state FROM backfill.jobs WHERE id = %s",
                                   (self.job_id,)).fetchone()
                    state = str(st[0]) if st else ""
                self.samples.append((time.monotonic() - t0, lag, state))
                del beats.written[:-beats.keep]


@dataclass
class Saboteur:
    """Pauses the replica's replay for ``on`` seconds, lets it replay for ``off``, repeatedly."""

    rdsn: str
    on: float
    off: float
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with psycopg.connect(self.rdsn, autocommit=True) as r:
            while not self.stop.is_set():
                r.execute("SELECT pg_wal_replay_pause()")
                self.stop.wait(self.on)
                r.execute("SELECT pg_wal_replay_resume()")
                self.stop.wait(self.off)
            r.execute("SELECT pg_wal_replay_resume()")


def caught_up(dsn: str, rdsn: str, timeout: float = 600) -> None:
    with psycopg.connect(dsn, autocommit=True) as p, psycopg.connect(rdsn, autocommit=True) as r:
        target = p.execute("SELECT pg_current_wal_lsn()").fetchone()
        deadline = time.monotonic() + timeout
        while True:
            row = r.execute("SELECT pg_last_wal_replay_lsn() >= %s", target).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not catch up")
            time.sleep(0.1)


def run_scenario(name: str, dsn: str, rdsn: str, args: argparse.Namespace) -> dict[str, Any]:
    bf = Backfill(dsn, actor="bench")
    job = bf.enqueue(update(TABLE, {"total": EXPR}, undo_log=False))
    sampler = Sampler(dsn, rdsn, args.sample, job_id=job.id)
    threads = [threading.Thread(target=sampler.run, daemon=True)]
    saboteur = Saboteur(rdsn, args.pause_on, args.pause_off) if name.startswith("slow") else None
    if saboteur:
        threads.append(threading.Thread(target=saboteur.run, daemon=True))
    ctl_stop = threading.Event()
    if name.endswith("+controller"):
        cfg = ControllerConfig(
            poll_s=args.poll,
            policy=PolicyConfig(limits={"replica_lag": Limit(args.lag, args.lag / 2)},
                                hold_s=args.hold, lookahead_s=args.lookahead),
            replicas=(Replica("replica", rdsn),))
        ctl = Controller(dsn, cfg, actor="controller:bench", stop=ctl_stop)
        threads.append(threading.Thread(target=ctl.run_forever, daemon=True))
    for t in threads:
        t.start()
    started = time.perf_counter()
    done = bf.run(job.id)
    elapsed = time.perf_counter() - started
    ctl_stop.set()
    sampler.stop.set()
    if saboteur:
        saboteur.stop.set()
    for t in threads:
        t.join(timeout=30)
    if done.state != JobState.SUCCEEDED:
        raise RuntimeError(f"{name}: job ended {done.state}: {done.state_reason}")
    lags = [lag for _, lag, state in sampler.samples
            if not math.isnan(lag) and state in ("running", "throttled")]
    throttles = sum(1 for e in bf.events(job.id) if e.to_state == "throttled")
    return {
        "scenario": name, "elapsed_s": elapsed, "rows_per_s": args.rows / elapsed,
        "lag_max_s": max(lags) if lags else None,
        "lag_p95_s": statistics.quantiles(lags, n=20)[-1] if len(lags) >= 20 else None,
        "throttles": throttles, "samples": sampler.samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--lag", type=float, default=2.0, help="The controller's lag threshold T (s).")
    p.add_argument("--hold", type=float, default=3.0)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--lookahead", type=float, default=None,
                   help="Predictive throttle horizon (s); default 2 polls, 0 turns it off.")
    p.add_argument("--pause-on", type=float, default=1.0)
    p.add_argument("--pause-off", type=float, default=0.3)
    p.add_argument("--sample", type=float, default=0.25)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--timeline", action="store_true", help="Print the lag over time.")
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.lookahead is None:
        args.lookahead = 2 * args.poll
    if set(scenarios) - set(SCENARIOS):
        p.error(f"scenarios are {', '.join(SCENARIOS)}")
    configure_logs(json=True, level="warning")
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-ctl-", dir="/tmp"))
    tmp.chmod(0o755)
    primary = LocalPostgres(tmp / "primary", fast=False)
    replica: LocalPostgres | None = None
    results: list[dict[str, Any]] = []
    try:
        primary.init()
        primary.start()
        with psycopg.connect(primary.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {BENCH_DB}")
        dsn = primary.dsn(BENCH_DB)
        Backfill(dsn).upgrade()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE bench_hb (at timestamptz NOT NULL)")
            c.execute("INSERT INTO bench_hb VALUES (clock_timestamp())")
        replica = primary.make_replica(tmp / "replica")
        replica.start()
        rdsn = replica.dsn(BENCH_DB)
        for name in scenarios:
            reset_table(dsn, KINDS["bigint"], args.rows)
            caught_up(dsn, rdsn)  # the reload's WAL is replayed before anything is measured
            r = run_scenario(name, dsn, rdsn, args)
            check_table(dsn, args.rows, name)
            results.append(r)
            print(f"{name:<20} {r['rows_per_s']:>10,.0f} rows/s  max lag {r['lag_max_s']:.2f}s",
                  file=sys.stderr, flush=True)
    finally:
        for server in (replica, primary):
            if server is not None:
                server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base = next((r for r in results if r["scenario"] == "healthy"), None)
    lines = [f"{human(args.rows)} rows, lag threshold T = {args.lag:g}s (resume below "
             f"{args.lag / 2:g}s, hold {args.hold:g}s, poll {args.poll:g}s, lookahead "
             f"{args.lookahead:g}s); slow replica: replay "
             f"paused {args.pause_on:g}s of every {args.pause_on + args.pause_off:g}s", "",
             "| scenario | rows/s | vs healthy | throttles | max lag | p95 lag |",
             "|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{r['rows_per_s'] / base['rows_per_s']:.2f}x" if base else "—"
        p95 = f"{r['lag_p95_s']:.2f}s" if r["lag_p95_s"] is not None else "—"
        lines.append(f"| {r['scenario']} | {r['rows_per_s']:,.0f} | {vs} | {r['throttles']} "
                     f"| {r['lag_max_s']:.2f}s | {p95} |")
    ctl = next((r for r in results if r["scenario"] == "slow+controller"), None)
    if ctl:
        ok = ctl["lag_max_s"] <= 2 * args.lag
        lines.append(f"\n- slow replica with the controller: max lag {ctl['lag_max_s']:.2f}s "
                     f"(target <= 2T = {2 * args.lag:g}s: {'ok' if ok else 'MISSED'})")
    healthy_ctl = next((r for r in results if r["scenario"] == "healthy+controller"), None)
    if base and healthy_ctl:
        ratio = healthy_ctl["rows_per_s"] / base["rows_per_s"]
        lines.append(f"- healthy throughput with the controller: {ratio:.2f}x without "
                     f"(target >= 0.90x: {'ok' if ratio >= 0.9 else 'MISSED'})")
    print("\n".join(lines))
    if args.timeline:
        for r in results:
            print(f"\n{r['scenario']}: t(s)  lag(s)  job state")
            step = max(1, int(1.0 / args.sample))
            for t, lag, state in r["samples"][::step]:
                print(f"  {t:6.1f}  {lag:6.2f}  {state}  {'#' * min(60, int(lag * 10))}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"controller-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"args": vars(args), "machine": machine_info(),
                               "results": results}, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
