"""PostgreSQL storage: schema and migrations, the exactly-once writer, the read queries."""

from telemetry_nb.store.reader import Reader
from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, MetricRow, RowBatch, WorkloadRow
from telemetry_nb.store.schema import SCHEMA_VERSION, SchemaTooNew, connect, migrate
from telemetry_nb.store.writer import RETRYABLE, IdCollision, Writer, WriteResult, delete_gpu

__all__ = ["RETRYABLE", "SCHEMA_VERSION", "EventRow", "GpuRow", "InventoryRow",
           "IdCollision", "MetricRow", "Reader", "RowBatch",
           "SchemaTooNew", "WorkloadRow", "WriteResult", "Writer", "connect", "delete_gpu", "migrate"]
