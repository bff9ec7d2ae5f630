"""What the sources read from a series' labels: GPU identity across exporter versions, MIG, inventory.

dcgm-exporter spelled some labels differently over the years (`Hostname` → `hostname`, `UUID` →
`uuid`); a MIG instance carries `GPU_I_ID`/`GPU_I_PROFILE` next to its parent GPU's `UUID`.
"""

from __future__ import annotations

from typing import NamedTuple

from telemetry_nb.model import mig_uuid

DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"


def first(labels: dict[str, str], *names: str) -> str:
    """The value of the first of `names` present in `labels` (exporter versions differ), else ''."""
    for name in names:
        value = labels.get(name)
        if value is not None:
            return value
    return ""


class Identity(NamedTuple):
    """Which inventory row a series belongs to, and what the inventory learns from its labels."""

    uuid: str
    parent_uuid: str
    mig_profile: str
    mig_instance: int | None
    pci_bus_id: str
    driver_version: str


def identity(uuid: str, labels: dict[str, str]) -> Identity:
    """The inventory identity of a series of GPU `uuid`; a MIG instance gets its own uuid (`mig_uuid`).

    Raises `ValueError` for a `GPU_I_ID` that is not an integer.
    """
    pci, driver = labels.get("pci_bus_id", ""), labels.get(DRIVER_LABEL, "")
    gi = labels.get("GPU_I_ID", "")
    if not gi.strip():
        return Identity(uuid, "", "", None, pci, driver)
    try:
        instance = int(gi)
    except ValueError:
        raise ValueError(f"non-integer GPU_I_ID {gi!r}") from None
    return Identity(mig_uuid(uuid, instance), uuid, labels.get("GPU_I_PROFILE", ""), instance, pci, driver)
