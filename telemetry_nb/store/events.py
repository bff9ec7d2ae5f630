"""GPU events (XID errors): a change of the last XID code a GPU reports is stored as one event.

The exporter's `DCGM_FI_DEV_XID_ERRORS` is the *last* XID code, not a count, so an event is a
reading whose code is non-zero and differs from the GPU's previous stored reading. The readings
themselves are telemetry rows, so the decision is taken against the table, inside the writer's
transaction: a redelivered or replayed batch adds nothing, a restarted source does not repeat an
event, and batches written out of order are corrected (the next reading after each new one is
re-evaluated too). Writers that commit at once would each miss the other's readings, so a
transaction first takes a lock on the GPUs' buckets (held until it commits): the later one then
decides against the earlier one's committed rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import psycopg

from telemetry_nb.model import XID_METRIC
from telemetry_nb.store.rows import EventRow

KIND_METRIC = {"xid": XID_METRIC}
EVENT_LOCK = 0x7E1E_E7E7  # advisory lock class of the event buckets (two-key form: (class, bucket))
EVENT_BUCKETS = 64

_EVALUATE = """
WITH cand(gpu_id, ts, message) AS (SELECT * FROM unnest(%(gpu)s::bigint[], %(ts)s::timestamptz[], %(msg)s::text[])),
m AS (SELECT id FROM metrics WHERE name = %(metric)s),
pts AS (
    SELECT DISTINCT ON (gpu_id, ts) gpu_id, ts, message FROM (
        SELECT gpu_id, ts, message FROM cand
        UNION ALL
        SELECT c.gpu_id, n.ts, NULL FROM cand c CROSS JOIN LATERAL (
            SELECT t.ts FROM telemetry t, m WHERE t.gpu_id = c.gpu_id AND t.metric_id = m.id AND t.ts > c.ts
            ORDER BY t.ts LIMIT 1) n
    ) u ORDER BY gpu_id, ts, message NULLS LAST
)
SELECT p.gpu_id, p.ts, p.message, cur.value AS code, prev.value AS prev
FROM pts p
CROSS JOIN LATERAL (SELECT t.value FROM telemetry t, m
                    WHERE t.gpu_id = p.gpu_id AND t.metric_id = m.id AND t.ts = p.ts) cur
LEFT JOIN LATERAL (SELECT t.value FROM telemetry t, m WHERE t.gpu_id = p.gpu_id AND t.metric_id = m.id
                   AND t.ts < p.ts ORDER BY t.ts DESC LIMIT 1) prev ON true
ORDER BY p.gpu_id, p.ts
"""


def record_changes(cur: psycopg.Cursor, events: Sequence[EventRow]) -> int:
    """Store the readings in `events` that are changes (and un-store ones that no longer are); returns new events."""
    added = 0
    for kind, metric in KIND_METRIC.items():
        mine = [e for e in events if e.kind == kind]
        if not mine:
            continue
        buckets = sorted({e.gpu_id % EVENT_BUCKETS for e in mine})  # in order: two writers never deadlock
        cur.execute("SELECT pg_advisory_xact_lock(%s, b) FROM unnest(%b::int[]) AS b", (EVENT_LOCK, buckets))
        rows = cur.execute(_EVALUATE, {"gpu": [e.gpu_id for e in mine], "ts": [e.ts for e in mine],
                                       "msg": [e.message for e in mine], "metric": metric}).fetchall()
        keep, drop = [], []
        for gpu_id, ts, message, code, prev in rows:
            changed = code != 0 and (prev is None or prev != code)
            (keep if changed else drop).append((gpu_id, ts, int(code), message or ""))
        if drop:
            cur.execute("DELETE FROM gpu_events e USING unnest(%b::bigint[], %b::timestamptz[]) AS d(gpu_id, ts) "
                        "WHERE e.gpu_id = d.gpu_id AND e.ts = d.ts AND e.kind = %s",
                        ([d[0] for d in drop], [d[1] for d in drop], kind))
        if keep:
            cur.execute("INSERT INTO gpu_events (gpu_id, ts, kind, code, message) "
                        "SELECT g, t, %s, c, m FROM unnest(%b::bigint[], %b::timestamptz[], %b::int[], %b::text[]) "
                        "AS k(g, t, c, m) ON CONFLICT DO NOTHING",
                        (kind, *[list(c) for c in zip(*keep, strict=True)]))
            added += cur.rowcount
    return added


def labels_json(labels: dict[str, str]) -> str:
    """Labels as the JSON text the `labels jsonb` column is written from."""
    return json.dumps(labels, separators=(",", ":"), sort_keys=True)
