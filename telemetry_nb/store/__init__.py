"""PostgreSQL storage: schema and migrations, the exactly-once writer, the read queries.

The names below load their module on first use, so that what needs only the row shapes
(`store.binary`, `store.rows`: the streamer and scraper) does not import psycopg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "is_data_error": "errors", "is_outage": "errors", "reason": "errors",
    "Reader": "reader",
    "EventRow": "rows", "GpuRow": "rows", "InventoryRow": "rows", "MetricRow": "rows", "RowBatch": "rows",
    "WorkloadRow": "rows",
    "SCHEMA_VERSION": "schema", "SchemaTooNew": "schema", "connect": "schema", "migrate": "schema",
    "postgres_probe": "schema",
    "IdCollision": "writer", "Writer": "writer", "WriteResult": "writer", "delete_gpu": "writer",
}

__all__ = ["SCHEMA_VERSION", "EventRow", "GpuRow", "IdCollision", "InventoryRow", "MetricRow", "Reader", "RowBatch",
           "SchemaTooNew", "WorkloadRow", "WriteResult", "Writer", "connect", "delete_gpu", "is_data_error",
           "is_outage", "migrate", "postgres_probe", "reason"]

if TYPE_CHECKING:
    from telemetry_nb.store.errors import is_data_error, is_outage, reason
    from telemetry_nb.store.reader import Reader
    from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, MetricRow, RowBatch, WorkloadRow
    from telemetry_nb.store.schema import SCHEMA_VERSION, SchemaTooNew, connect, migrate, postgres_probe
    from telemetry_nb.store.writer import IdCollision, Writer, WriteResult, delete_gpu


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:  # a submodule (`store.lifecycle`) that nothing imported yet
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = value
        return value
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
