"""Zero-downtime migrations as data: a file of operations, each expanded into steps.

A migration file (TOML) names an id, a description and its operations. Each operation turns
into *steps* in three phases, in the expand/contract pattern (pgroll's start/complete/rollback):

- ``start`` (expand): additive changes the running application tolerates (a nullable column, a
  sync trigger, a ``NOT VALID`` constraint, a concurrent index), then the backfill jobs that
  fill the new shape, then validations;
- ``complete`` (contract): the changes that need the backfill done (``SET NOT NULL``, the column
  swap) and the destructive ones (drop a column, table or index), behind the gate;
- ``rollback``: undoes ``start``, in reverse order; every step is idempotent (``IF EXISTS``).

A step is plain data: its statements, the lock it takes, how long it holds it (a duration
class), its risk and how it runs (in a transaction, outside one for ``CONCURRENTLY``, as a
backfill job, or as a read-only check). ``executor`` runs them; the plan only
plans, against the catalog of the database it will run on, so a missing table or column is an
error before anything is written.

Where things live: ``file`` reads a migration file, ``shape`` the catalog, ``operations/`` one
module per operation, ``steps`` the vocabulary of a plan, ``plan`` builds one, ``executor``
runs it, ``lint`` checks raw SQL.
"""
