"""A job's binding: the exact relations (by oid) and key columns its batches work on.

A job is bound when it is prepared for a run: its source (checked against the oid stored at
enqueue), the destination of a copy or move, its undo table, and the key's columns (attribute
number and type). Every batch proves, inside its own transaction and after its write has
locked those relations, that the names it used still resolve to the same oids and the key to
the same columns. A table dropped and recreated (or renamed, or its key column replaced)
between two batches therefore makes the batch commit nothing: :class:`TableChanged`.

Why after the write: the write (and the keyset probe before it) lock every relation the batch
touches until COMMIT, and neither a DROP nor a RENAME can take those relations' names away while
the locks are held, so what the proof sees is what the write wrote. The names are looked up
exactly as stored (schema and relation name compared as text, never parsed), so no
``search_path`` or quoting can make the proof look at another table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backfill.core.catalog import Conn
from backfill.core.errors import TableChanged
from backfill.core.sqltext import render_qualified

#: One round trip, pipelined with the checkpoint: the oid each (schema, name) resolves to now
#: (0: none), the key columns' attribute numbers and types on the source's oid, and which of
#: the relations the batch must have written this backend holds a row-writing lock on.
_PROOF = """
SELECT ARRAY(SELECT coalesce(c.oid, 0)::bigint
             FROM unnest(%(nsp)s::text[], %(rel)s::text[]) WITH ORDINALITY AS b(nsp, rel, i)
             LEFT JOIN pg_namespace n ON n.nspname = b.nsp
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = b.rel
             ORDER BY b.i),
       ARRAY(SELECT coalesce(a.attnum, 0)::bigint
             FROM unnest(%(key)s::text[]) WITH ORDINALITY AS k(name, i)
             LEFT JOIN pg_attribute a ON a.attrelid = %(src)s AND a.attname = k.name
                                     AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY k.i),
       ARRAY(SELECT coalesce(a.atttypid, 0)::bigint
             FROM unnest(%(key)s::text[]) WITH ORDINALITY AS k(name, i)
             LEFT JOIN pg_attribute a ON a.attrelid = %(src)s AND a.attname = k.name
                                     AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY k.i),
       ARRAY(SELECT DISTINCT l.relation::bigint FROM pg_locks l
             WHERE l.pid = pg_backend_pid() AND l.granted AND l.locktype = 'relation'
               AND l.relation = ANY (%(written)s::oid[])
               AND l.mode IN ('RowShareLock', 'RowExclusiveLock', 'ShareRowExclusiveLock',
                              'ExclusiveLock', 'AccessExclusiveLock'))
"""


@dataclass(frozen=True)
class Relation:
    role: str      # "source", "destination", "undo log"
    schema: str
    name: str
    oid: int
    #: The batch's write writes (or row-locks) this relation: a batch that wrote holds a
    #: row-writing lock on exactly this oid. Names alone cannot prove it: a schema renamed
    #: and renamed back around a statement takes no lock on the tables inside it.
    written: bool = False

    @property
    def display(self) -> str:
        return render_qualified(self.schema, self.name)


@dataclass(frozen=True)
class Binding:
    """What a job's batches must find, every time: these relations under these names, and the
    key's columns (on the first relation, the source) with these attribute numbers and types."""

    relations: tuple[Relation, ...]
    key: tuple[str, ...]
    key_attnums: tuple[int, ...]
    key_typids: tuple[int, ...]

    @property
    def source(self) -> Relation:
        return self.relations[0]

    def params(self) -> dict[str, Any]:
        return {"nsp": [r.schema for r in self.relations],
                "rel": [r.name for r in self.relations],
                "key": list(self.key), "src": self.source.oid,
                "written": [r.oid for r in self.relations if r.written]}

    def send(self, conn: Conn) -> Any:
        """Send the proof (in a pipeline: queued, answered with what follows); the cursor's
        row goes to :meth:`check`."""
        return conn.execute(_PROOF, self.params())

    def check(self, row: Any, *, wrote: bool = True) -> None:
        """Raise :class:`TableChanged` unless ``row`` (the proof's result) matches; ``wrote``:
        the batch ran its write, so it must hold a row-writing lock on each written relation."""
        if row is None:
            raise TableChanged("the binding proof returned nothing")
        oids, attnums, typids, locked = row
        changes = []
        for rel, now in zip(self.relations, oids, strict=True):
            if int(now) == rel.oid:
                continue
            if int(now) == 0:
                changes.append(f"the {rel.role} table {rel.display} (oid {rel.oid}) no longer "
                               "exists under that name (dropped or renamed)")
            else:
                changes.append(f"the {rel.role} table {rel.display} was dropped and recreated "
                               f"(oid {rel.oid} is now {int(now)})")
        if not changes and (tuple(map(int, attnums)) != self.key_attnums
                            or tuple(map(int, typids)) != self.key_typids):
            changes.append(f"the key ({', '.join(self.key)}) of {self.source.display} is no "
                           "longer the same columns of the same types (dropped, renamed or "
                           "altered)")
        if not changes and wrote:
            held = set(map(int, locked))
            changes.extend(
                f"the batch's write did not go to the {rel.role} table {rel.display} (oid "
                f"{rel.oid}): its name led the statement to another relation (a schema or "
                "table renamed meanwhile)"
                for rel in self.relations if rel.written and rel.oid not in held)
        if changes:
            raise TableChanged(
                "; ".join(changes) + ": this batch wrote nothing (rolled back); the job's "
                "checkpoints belong to the table it was bound to. Cancel it and enqueue a "
                "new job for the new table")

    def prove(self, conn: Conn, *, wrote: bool = True) -> None:
        """Run the proof now, on ``conn`` (inside the transaction whose locks it relies on)."""
        self.check(self.send(conn).fetchone(), wrote=wrote)


def bind(conn: Conn, relations: list[Relation], key: tuple[str, ...]) -> Binding:
    """The binding as the catalog has it now (relation oids as given, key columns looked up)."""
    draft = Binding(tuple(relations), key, (), ())
    row = conn.execute(_PROOF, draft.params()).fetchone()
    assert row is not None
    return Binding(tuple(relations), key, tuple(map(int, row[1])), tuple(map(int, row[2])))
