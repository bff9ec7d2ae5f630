"""telemetry-nb: DCGM GPU telemetry from CSV exports through Redis Streams into PostgreSQL, served over REST."""

__version__ = "0.1.0"
