"""How a job reads outside a table: as JSON for scripts, its canary as one sentence."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backfill.core.durations import format_duration

if TYPE_CHECKING:
    from backfill.state import checkpoints, store

# -- inspect ----------------------------------------------------------------------------------


def job_json(job: store.JobRecord, prog: checkpoints.Progress | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": job.id, "name": job.name, "kind": job.kind, "table": job.table,
        "key": list(job.key_columns), "state": str(job.state), "state_reason": job.state_reason,
        "rows_estimate": job.rows_estimate, "options": job.options.to_json(),
        "created_by": job.created_by, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "owner": job.owner,
        "last_error": job.last_error, "error_range": job.error_range,
    }
    if prog is not None:
        data.update({"rows_done": prog.rows_scanned, "rows_changed": prog.rows_affected,
                     "batches": prog.batches, "rows_per_s": prog.recent_rows_per_s,
                     "batch_size": prog.current_batch_size, "eta_s": prog.eta_s,
                     "last_batch_at": prog.last_batch_at, "stalled_since": prog.stalled_since,
                     "expected_interval_s": prog.expected_interval_s})
    return data


def canary_text(job: store.JobRecord, canary: dict[str, Any] | None) -> str:
    """The canary's measured rows/s, its verification, and the rest's projected duration."""
    if canary is None:
        return f"canary of {job.canary_rows:,} rows not reached yet" if job.canary_rows else ""
    rows, rate = int(canary.get("canary_rows") or 0), float(canary.get("canary_rows_per_s") or 0)
    rest = max(0, (job.rows_estimate or 0) - rows)
    verified = {True: "verified", False: "FAILED verification",
                None: "being verified"}[canary.get("verified")]
    projected = format_duration(rest / rate) if rate > 0 else "-"
    return (f"canary {rows:,} rows at {rate:,.0f} rows/s, {verified}; the other ~{rest:,} "
            f"rows projected at {projected}"
            + (f"; approved by {job.approved_by}" if job.approved_by else ""))
