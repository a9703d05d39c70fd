"""Moving tables from MySQL/MariaDB to PostgreSQL, online, with the checkpoint model of the
rest of backfill: keyset-batched copy whose checkpoint commits with each batch in the
destination, then catch-up from the binary log with the position committed the same way.

- :mod:`backfill.mysql.source`: the source DSN (no password: an option file) and connections.
- :mod:`backfill.mysql.schema`: information_schema → PostgreSQL DDL through cast rules.
- :mod:`backfill.mysql.values`: one canonical Python value per MySQL value, and the casts.
- :mod:`backfill.mysql.copy`: the resumable copy.
- :mod:`backfill.mysql.binlog`: the catch-up, and its lag.
- :mod:`backfill.mysql.verify`: per-range counts and checksums across the two engines.
"""
