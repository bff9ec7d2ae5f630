"""Row counts per metric, kept by the writers without a hot row: each transaction adds to a slot of its own.

A transaction takes the first free slot (a transaction-scoped advisory lock, tried in order from the
writer's usual one), so two collectors committing at once never update the same row and never wait on
each other; the count of a metric is the sum over its slots. Slots in use stay few: about as many as
writers ever ran at once.
"""

from __future__ import annotations

import psycopg

SLOT_LOCK = 0x7E1E_C047  # advisory lock class of the count slots (two-key form: (class, slot))
SLOTS = 1024

# One statement: the slot is taken once (an InitPlan that stops at the first free slot, so it holds one
# lock), then the counts added. With every slot taken it waits for the writer's usual one.
_ADD = ("INSERT INTO metric_row_counts AS r (slot, metric_id, rows) "
        "SELECT coalesce((SELECT g.i %% %(slots)s FROM generate_series(%(first)s, %(first)s + %(slots)s - 1) AS g(i) "
        "                 WHERE pg_try_advisory_xact_lock(%(lock)s, g.i %% %(slots)s) LIMIT 1), %(first)s), "
        "       d.id, d.n FROM unnest(%(ids)s::int[], %(ns)s::bigint[]) AS d(id, n) "
        "ON CONFLICT (slot, metric_id) DO UPDATE SET rows = r.rows + EXCLUDED.rows "
        "RETURNING slot")

TOTALS = ("SELECT metric_id, sum(rows)::bigint AS rows FROM "
          "(SELECT metric_id, rows FROM metric_row_counts UNION ALL SELECT metric_id, rows FROM metric_rows) c "
          "GROUP BY metric_id")
"""Per-metric totals: the slots plus `metric_rows` (what collectors of schema ≤ 5 still add to during an upgrade)."""


def add(cur: psycopg.Cursor, per_metric: dict[int, int], first_slot: int = 0) -> int | None:
    """Add (or, negative, subtract) row counts per metric in the cursor's transaction; returns the slot used."""
    ids = sorted(i for i, n in per_metric.items() if n)
    if not ids:
        return None
    row = cur.execute(_ADD, {"slots": SLOTS, "first": first_slot % SLOTS, "lock": SLOT_LOCK, "ids": ids,
                             "ns": [per_metric[i] for i in ids]}).fetchone()
    return row[0]


def total(conn: psycopg.Connection) -> int:
    """All rows stored, from the counts (not by counting the table)."""
    return conn.execute(f"SELECT coalesce(sum(rows), 0)::bigint FROM ({TOTALS}) t").fetchone()[0]
