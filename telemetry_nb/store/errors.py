"""Which database errors are outages (retry the same work later) and which are refusals of the data.

Classified by SQLSTATE, not by psycopg's exception class: psycopg files `54000 index row size exceeds
btree maximum` under `OperationalError`, the class it also uses for a refused connection, so a class
test would retry a bad row forever. An error without a SQLSTATE is an outage only when it is the
driver's own connection failure (refused, reset, closed); anything else (a text field with NUL that
psycopg refuses before sending, an id collision) is a refusal of the data.
"""

from __future__ import annotations

import psycopg

# SQLSTATE classes and codes that say "the server or the connection failed, not your data"
OUTAGE_CLASSES = ("08",  # connection exception
                  "53",  # insufficient resources (disk full, out of memory, too many connections)
                  "57P",  # operator intervention: admin/crash shutdown, cannot connect now, database dropped
                  "58")  # system error (I/O error) outside PostgreSQL
OUTAGE_CODES = frozenset({"40001",  # serialization_failure
                          "40P01",  # deadlock_detected
                          "55P03",  # lock_not_available
                          "25006"})  # read_only_sql_transaction: a failover left us on a standby
# 57014 query_canceled (a statement timeout) is deliberately not an outage: a batch too big for the
# timeout would time out on every retry, while split into smaller transactions it goes through.


def is_outage(err: BaseException) -> bool:
    """True when `err` means "PostgreSQL is unreachable or busy, retry the same work"; False for data errors."""
    if not isinstance(err, psycopg.Error):
        return isinstance(err, OSError)
    state = err.sqlstate
    if state:
        return state in OUTAGE_CODES or state.startswith(OUTAGE_CLASSES)
    return isinstance(err, psycopg.OperationalError | psycopg.InterfaceError)  # connect/timeout/closed, pool timeout


def is_data_error(err: BaseException) -> bool:
    """True when PostgreSQL (or psycopg on its behalf) refused the data itself: never worth retrying as is."""
    return isinstance(err, psycopg.Error) and not is_outage(err)


def reason(err: BaseException) -> str:
    """`ClassName [SQLSTATE]: first line of the message`, short enough for a log line or a dead letter."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    state = getattr(err, "sqlstate", None)
    return f"{type(err).__name__}{f' [{state}]' if state else ''}: {text}"[:1000]
