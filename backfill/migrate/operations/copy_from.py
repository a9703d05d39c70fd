"""``copy_from``: a table of another database (PostgreSQL, or MySQL/MariaDB) copied into a
table here by a copy job of the migration's own, run in ``start`` and verified there."""

from __future__ import annotations

from typing import Any

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.job.spec import JobSpec, source_engine
from backfill.migrate.operations.base import Operation
from backfill.migrate.steps import Step


class CopyFrom(Operation):
    """``source`` (a DSN without password), ``table`` (there), ``dest`` (here: it must exist
    when ``start`` runs, e.g. made by ``create_table`` earlier in the file, or by
    ``convert-schema --apply``); optional ``key``, and for MySQL ``casts``
    (``table.column=type``, as given to ``convert-schema``)."""

    def build(self) -> str:
        source = self.text("source")
        table = self.text("table")
        sqltext.qualified_name(table, slot="`table`")
        dest = self.shape.table(self.text("dest"))
        key = self.names("key", required=False)
        casts = self.get("casts", []) or []
        if not isinstance(casts, list) or not all(isinstance(c, str) and c.strip()
                                                  for c in casts):
            raise InvalidInput(f"{self.where()}: `casts` must be a list of "
                               "\"table.column=type\"")
        options = dict(self.mig.backfill)
        extra = self.get("backfill", {}) or {}
        if not isinstance(extra, dict):
            raise InvalidInput(f"{self.where()}: `backfill` must be a table of job options")
        options.update(extra)
        options.pop("undo_log", None)   # a copy keeps none
        engine = "MySQL/MariaDB" if source_engine(source) == "mysql" else "another database"
        description = f"copy {table} from {engine} into {dest.qualified}"
        spec: dict[str, Any] = {
            "kind": "copy", "table": table, "dest": dest.qualified, "source_dsn": source,
            "key": list(key), "casts": list(casts),
            "name": f"migration {self.mig.id} op {self.i + 1}: {description}"}
        try:   # the shape (a password in the DSN, casts for a PostgreSQL source), now
            JobSpec.from_json(spec).with_options(**options)
        except InvalidInput as exc:
            raise InvalidInput(f"{self.where()}: {exc}") from None
        spec["options"] = options
        self.steps.append(Step(phase="start", op=self.i, description=description,
                               mode="backfill", duration="backfill",
                               lock=f"ROW EXCLUSIVE on {dest.qualified} (one batch's COPY "
                               "at a time)", risk="low", table=dest.qualified, job=spec))
        self.warnings.append(f"rollback cancels the copy job; the rows it copied stay in "
                             f"{dest.qualified}")
        return description
