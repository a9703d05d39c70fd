#!/usr/bin/env python3
"""Two application versions through a migration, on a large table: the application's latency
per phase against its baseline.

Runs ``tests/integration/test_two_versions.py`` (split, merge, rename, change of type; an
old-shape and a new-shape pgbench script at a fixed rate, ``-M prepared``, no reconnects) on
``--rows`` rows instead of the test's 20k, without its start -> rollback round trip, and
prints per case, version and phase the transactions, max and p99 latency, and max against the
old version's baseline (before start). Every assertion of the test still holds: 0 application
errors, 0 lost writes, the schema after complete. Raw reports:
``bench/results/two-versions-<timestamp>.jsonl``.

    .venv/bin/python bench/bench_two_versions.py --rows 1000000
    .venv/bin/python bench/bench_two_versions.py --rows 200000 --cases split rename
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PHASES = ("baseline", "start", "both", "complete", "after")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=30,
                    help="transactions per second, per version (default 30)")
    ap.add_argument("--old-seconds", type=float, default=0.0,
                    help="the old version's run: baseline + start + both (default: scaled "
                         "from --rows)")
    ap.add_argument("--complete-seconds", type=float, default=0.0,
                    help="time allowed for complete (default: scaled from --rows)")
    ap.add_argument("--cases", nargs="*", default=["split", "merge", "rename", "change_type"])
    args = ap.parse_args()
    scale = args.rows / 100_000
    old_s = args.old_seconds or max(9.0, 12 + 12 * scale)
    complete_s = args.complete_seconds or max(2.0, 4 * scale)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"two-versions-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.jsonl"
    env = dict(os.environ, BACKFILL_TWO_VERSION_ROWS=str(args.rows),
               BACKFILL_TWO_VERSION_RATE=str(args.rate),
               BACKFILL_TWO_VERSION_OLD_S=str(old_s),
               BACKFILL_TWO_VERSION_COMPLETE_S=str(complete_s),
               BACKFILL_TWO_VERSION_ROLLBACK_FIRST="0",
               BACKFILL_TWO_VERSION_TIMEOUT=str(int(old_s + complete_s + 600)),
               BACKFILL_TWO_VERSION_REPORT=str(out),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    select = " or ".join(f"[{c}]" for c in args.cases)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           str(REPO / "tests/integration/test_two_versions.py"), "-k", select]
    print(f"rows={args.rows} rate={args.rate}/s per version, old version {old_s:.0f}s, "
          f"complete allowed {complete_s:.0f}s; {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
    if not out.exists():
        print("no report written", file=sys.stderr)
        return rc or 1
    print()
    print(f"{args.rows:,} rows, {args.rate} transactions/s per version; latency in ms "
          "(max, p99); x = max / old version's baseline max")
    print()
    print("| case | start s | complete s | version | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for line in out.read_text().splitlines():
        r = json.loads(line)
        base = r["old"].get("baseline", {}).get("max_ms") or 0.0
        for ver in ("old", "new"):
            cells = []
            for ph in PHASES:
                p = r[ver].get(ph)
                if not p:
                    cells.append("-")
                    continue
                x = f" ({p['max_ms'] / base:.1f}x)" if base else ""
                cells.append(f"{p['max_ms']:.0f} / {p['p99_ms']:.0f}{x}")
            print(f"| {r['case']} | {r['phase_s']['start']} | {r['phase_s']['complete']} | "
                  f"{ver} | " + " | ".join(cells) + " |")
    print(f"\nraw: {out.relative_to(REPO)}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
