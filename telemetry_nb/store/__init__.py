"""PostgreSQL storage: schema and migrations, the exactly-once writer, the read queries."""

from telemetry_nb.store.errors import is_data_error, is_outage, reason
from telemetry_nb.store.reader import Reader
from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, MetricRow, RowBatch, WorkloadRow
from telemetry_nb.store.schema import SCHEMA_VERSION, SchemaTooNew, connect, migrate, postgres_probe
from telemetry_nb.store.writer import IdCollision, Writer, WriteResult, delete_gpu

__all__ = ["SCHEMA_VERSION", "EventRow", "GpuRow", "IdCollision", "InventoryRow", "MetricRow", "Reader", "RowBatch",
           "SchemaTooNew", "WorkloadRow", "WriteResult", "Writer", "connect", "delete_gpu", "is_data_error",
           "is_outage", "migrate", "postgres_probe", "reason"]
