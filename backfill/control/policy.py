"""The controller's policy: a pure function from health readings to throttle decisions.

Collectors (``backfill.control.signals``) do the I/O and produce :class:`Reading` values; this module
decides, with no database and no clock of its own, so every rule is unit-tested:

- A reading at or above its limit's ``throttle_at`` throttles a running job.
- A reading that cannot be taken (``value is None``) counts as a breach: fail closed.
- A throttled job resumes only when every reading has stayed below its ``resume_below`` for
  ``hold_s`` seconds (hysteresis: between the two thresholds nothing changes).
- Limits are global, with per-job overrides by job name; readings are global (replica lag,
  logical slots, long transactions, probes) or about one job (lock waiters on its tables,
  autovacuum on its table).
- Only ``running`` and ``throttled`` jobs are decided on: a job an operator paused is not the
  controller's to resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from backfill.core.durations import format_duration
from backfill.job.states import JobState

#: How each kind of reading is shown in reasons.
UNITS: dict[str, str] = {
    "replica_lag": "s",
    "replica_lag_bytes": "bytes",
    "lock_wait": "s",
    "lock_waiters": "sessions",
    "long_transaction": "s",
    "slot_retained": "bytes",
    "autovacuum": "",
}


@dataclass(frozen=True)
class Reading:
    """One measured signal. ``kind`` selects the limit; ``signal`` names the source
    (``replica_lag[replica1]``); ``job_id`` is set for readings about one job only."""

    kind: str
    signal: str
    value: float | None
    error: str | None = None
    detail: str | None = None
    job_id: int | None = None
    #: Change per second since the previous poll (set by the controller), for prediction.
    trend: float | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"signal": self.signal, "value": self.value}
        if self.error:
            out["error"] = self.error
        if self.detail:
            out["detail"] = self.detail
        if self.job_id is not None:
            out["job_id"] = self.job_id
        return out


@dataclass(frozen=True)
class Limit:
    """Throttle at ``throttle_at`` or above; resume only below ``resume_below``."""

    throttle_at: float
    resume_below: float

    def __post_init__(self) -> None:
        if self.resume_below > self.throttle_at:
            raise ValueError(
                f"the resume threshold ({self.resume_below}) must not be above the throttle "
                f"threshold ({self.throttle_at})")

    @classmethod
    def at(cls, throttle_at: float, resume_ratio: float = 0.5) -> Limit:
        return cls(throttle_at, throttle_at * resume_ratio)


@dataclass(frozen=True)
class PolicyConfig:
    limits: Mapping[str, Limit] = field(default_factory=dict)
    per_job: Mapping[str, Mapping[str, Limit]] = field(default_factory=dict)
    hold_s: float = 10.0
    #: Throttle early when a rising signal of these kinds will reach its limit within
    #: ``lookahead_s`` at its current rate: by the time a throttle takes effect (a poll, the
    #: batch in flight) the replica still has the WAL written before it to replay, and its lag
    #: keeps growing meanwhile.
    predict: frozenset[str] = frozenset({"replica_lag"})
    lookahead_s: float = 0.0

    def limits_for(self, job_name: str) -> Mapping[str, Limit]:
        overrides = self.per_job.get(job_name)
        return {**self.limits, **overrides} if overrides else self.limits


@dataclass(frozen=True)
class JobView:
    id: int
    name: str
    state: JobState


@dataclass(frozen=True)
class Decision:
    job_id: int
    action: Literal["throttle", "resume"]
    reason: str
    readings: tuple[Reading, ...]


#: Signals whose name differs from their kind (see backfill.control.signals.replication).
_KIND_OF_SIGNAL = {"standby_replay_lag": "replica_lag", "standby_replay_bytes": "replica_lag_bytes"}


def kind_of(signal: str) -> str:
    """The kind (the limit it is compared with) of a signal named ``base[source]``; a probe's
    kind keeps its name (``probe[depth]`` is ``probe:depth``), as its limit does."""
    base, _, rest = signal.partition("[")
    if base == "probe" and rest:
        return f"probe:{rest.removesuffix(']')}"
    return _KIND_OF_SIGNAL.get(base, base)


def show(kind: str, value: float) -> str:
    unit = UNITS.get(kind, "")
    if unit == "s":
        return f"{value:.1f}s" if value < 10 else format_duration(value)
    if unit == "bytes":
        return format_bytes(value)
    if kind == "autovacuum":
        return "running" if value else "idle"
    return f"{value:g}" + (f" {unit}" if unit else "")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _breach(r: Reading, limit: Limit, config: PolicyConfig) -> str | None:
    if r.value is None:
        return f"cannot read {r.signal}: {r.error or 'no value'} (fail closed)"
    if r.value >= limit.throttle_at:
        text = f"{r.signal} {show(r.kind, r.value)} >= {show(r.kind, limit.throttle_at)}"
        return text + (f" ({r.detail})" if r.detail else "")
    if (r.kind in config.predict and config.lookahead_s > 0 and r.trend is not None
            and r.trend > 0 and r.value + r.trend * config.lookahead_s >= limit.throttle_at):
        return (f"{r.signal} {show(r.kind, r.value)} rising {r.trend:.2f}/s: "
                f">= {show(r.kind, limit.throttle_at)} within "
                f"{format_duration(config.lookahead_s)}")
    return None


def decide(
    config: PolicyConfig,
    jobs: Iterable[JobView],
    readings: Iterable[Reading],
    clear_since: Mapping[int, float],
    now: float,
) -> tuple[list[Decision], dict[int, float]]:
    """Decisions for ``jobs`` given ``readings`` at time ``now`` (seconds, any monotonic
    clock). ``clear_since`` maps throttled jobs to when all their readings last became clear;
    the returned map replaces it."""
    readings = list(readings)
    decisions: list[Decision] = []
    clear: dict[int, float] = {}
    for job in jobs:
        if job.state not in (JobState.RUNNING, JobState.THROTTLED):
            continue
        limits = config.limits_for(job.name)
        mine = [r for r in readings if (r.job_id is None or r.job_id == job.id) and r.kind in limits]
        breaches = [(r, why) for r in mine
                    if (why := _breach(r, limits[r.kind], config)) is not None]
        if job.state == JobState.RUNNING:
            if breaches:
                decisions.append(Decision(job.id, "throttle", "; ".join(w for _, w in breaches),
                                          tuple(r for r, _ in breaches)))
            continue
        # Throttled: resume only after every reading stayed below its resume threshold.
        settled = not breaches and all(
            r.value is not None and r.value < limits[r.kind].resume_below for r in mine)
        if not settled:
            continue
        since = clear_since.get(job.id, now)
        if now - since >= config.hold_s:
            decisions.append(Decision(
                job.id, "resume",
                f"every signal below its resume threshold for {format_duration(now - since)}",
                tuple(mine)))
        else:
            clear[job.id] = since
    return decisions, clear


def rate_shares(budget: float | None, jobs: Iterable[int]) -> dict[int, float | None]:
    """Split a global budget (rows/s or batches/s across the database) evenly among the
    running jobs; ``None`` everywhere when there is no budget."""
    ids = list(jobs)
    if budget is None or budget <= 0 or not ids:
        return dict.fromkeys(ids)
    return dict.fromkeys(ids, budget / len(ids))
