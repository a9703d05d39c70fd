"""The plan's vocabulary: a step (statements, lock, duration, risk, mode) and an operation's plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PHASES = ("start", "complete", "rollback")
#: How a step runs. ``tx``: its statements and its "done" mark commit in one transaction.
#: ``concurrent``: outside any transaction (CONCURRENTLY). ``backfill``: a backfill job.
#: ``check``: a read-only query that must return true.
MODES = ("tx", "concurrent", "backfill", "check")


# -- the plan's vocabulary ------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One unit the executor runs and records; everything the plan prints about it."""

    phase: str
    op: int                                  # index of its operation in the file (0-based)
    description: str
    mode: str
    statements: tuple[str, ...] = ()
    lock: str = "none"                       # the strongest lock taken, and on what
    duration: str = "instant"                # instant | scan | build | backfill
    risk: str = "low"                        # low | medium | high
    table: str | None = None                 # qualified table whose size drives the estimate
    index: str | None = None                 # concurrent builds: the index a failure leaves
    job: dict[str, Any] | None = None        # backfill steps: the JobSpec as JSON
    note: str | None = None
    #: Tables a ``tx`` step locks before its statements, in this order: (schema, table,
    #: mode). A statement that locks two tables takes them in its own order (a foreign key:
    #: the child, then the parent); the application's writes through triggers take them
    #: parent first, so the step does too, or the two deadlock.
    lock_order: tuple[tuple[str, str, str], ...] = ()
    #: (rows, bytes) ``table`` is expected to have when the step runs, for a table this
    #: migration creates and fills (the plan's size of it is 0).
    expected: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "op": self.op, "description": self.description,
                "mode": self.mode, "statements": list(self.statements), "lock": self.lock,
                "duration": self.duration, "risk": self.risk, "table": self.table,
                "index": self.index, "job": self.job, "note": self.note,
                "lock_order": [list(x) for x in self.lock_order],
                "expected": list(self.expected) if self.expected else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Step:
        return cls(phase=d["phase"], op=int(d["op"]), description=d["description"],
                   mode=d["mode"], statements=tuple(d.get("statements") or ()),
                   lock=d.get("lock", "none"), duration=d.get("duration", "instant"),
                   risk=d.get("risk", "low"), table=d.get("table"), index=d.get("index"),
                   job=d.get("job"), note=d.get("note"),
                   lock_order=tuple((str(a), str(b), str(c))
                                    for a, b, c in d.get("lock_order") or ()),
                   expected=(int(d["expected"][0]), int(d["expected"][1]))
                   if d.get("expected") else None)


@dataclass(frozen=True)
class OpPlan:
    """What one operation does: its goal, its steps per phase, and what to know about it."""

    op: int
    kind: str
    goal: str
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()
    irreversible: str | None = None          # what `complete` destroys, when it does
    #: What the data says against it: ``plan`` shows these, ``start`` refuses while any holds.
    blockers: tuple[str, ...] = ()


def ordered_steps(plans: Iterable[OpPlan]) -> dict[str, list[Step]]:
    """Steps per phase in execution order: start runs each operation's DDL, then the
    backfills, then the VALIDATEs, then the checks; complete in file order; rollback in
    reverse."""
    steps: dict[str, list[Step]] = {p: [] for p in PHASES}
    plans = list(plans)
    # VALIDATE comes after the backfills: a constraint may be about a column they fill.
    def rank(s: Step) -> int:
        if s.mode == "check":
            return 3
        if s.mode == "backfill":
            return 1
        return 2 if s.duration == "scan" else 0

    start = [s for p in plans for s in p.steps if s.phase == "start"]
    steps["start"] = sorted(start, key=rank)   # stable: file order kept within a rank
    steps["complete"] = [s for p in plans for s in p.steps if s.phase == "complete"]
    steps["rollback"] = [s for p in reversed(plans) for s in reversed(p.steps)
                         if s.phase == "rollback"]
    return steps
