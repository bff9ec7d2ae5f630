"""The REST API gateway over the store."""

from telemetry_nb.api.app import create_app

__all__ = ["create_app"]
