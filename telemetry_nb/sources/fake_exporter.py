"""A stand-in for a fleet of dcgm-exporters: generated GPUs served in the Prometheus text format.

For the demo (so the scrape path is what a new user sees working without GPUs) and the scrape
benchmark. One process serves many targets at `/target/<i>/metrics` (`/metrics` is target 0),
each host with `gpus` GPUs and `fields` DCGM fields, the exporter's label set, HELP/TYPE lines,
and values that change every scrape (a few pre-rendered variants per target rotate, so serving
stays cheap). A minimal asyncio HTTP/1.1 server with keep-alive: nothing else is needed here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid as uuidlib

log = logging.getLogger(__name__)

FIELDS = (  # the CSV generator's ten first (what the notebooks chart), then XID, then the rest of a real default set
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_VGPU_LICENSE_STATUS", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_SM_OCCUPANCY", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PIPE_FP64_ACTIVE", "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES",
    "DCGM_FI_PROF_NVLINK_TX_BYTES", "DCGM_FI_PROF_NVLINK_RX_BYTES", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT", "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_RETIRED_DBE", "DCGM_FI_DEV_PSTATE", "DCGM_FI_DEV_FAN_SPEED",
)
# plausible (idle, busy) value ranges; fields not listed read 0
_RANGES = {
    "DCGM_FI_DEV_GPU_UTIL": ((0, 2), (60, 100)), "DCGM_FI_DEV_MEM_COPY_UTIL": ((0, 1), (15, 60)),
    "DCGM_FI_DEV_GPU_TEMP": ((27, 33), (55, 75)), "DCGM_FI_DEV_MEMORY_TEMP": ((30, 36), (55, 80)),
    "DCGM_FI_DEV_POWER_USAGE": ((60, 75), (350, 690)), "DCGM_FI_DEV_FB_USED": ((0, 512), (45000, 79000)),
    "DCGM_FI_DEV_FB_FREE": ((81000, 81559), (2500, 36000)), "DCGM_FI_DEV_SM_CLOCK": ((345, 345), (1755, 1980)),
    "DCGM_FI_DEV_MEM_CLOCK": ((2619, 2619), (2619, 2619)), "DCGM_FI_DEV_POWER_MGMT_LIMIT": ((700, 700), (700, 700)),
    "DCGM_FI_DEV_PSTATE": ((8, 8), (0, 0)),
}
XID_GPU = (1, 3)  # (host, gpu) of the one fake GPU that reports an XID error
MODEL = "NVIDIA H100 80GB HBM3"
DRIVER = "550.54.15"


def render_target(index: int, gpus: int = 8, fields: int = 10, variant: int = 0, seed: int = 0) -> bytes:
    """The /metrics body of fake host `index`: `gpus` GPUs × the first `fields` FIELDS, values of `variant`."""
    rng = random.Random(f"{seed}-{index}")
    host = f"gpu-node-{index + 1:04d}"
    uuids = [f"GPU-{uuidlib.UUID(int=rng.getrandbits(128))}" for _ in range(gpus)]
    busy = [rng.random() < 0.7 for _ in range(gpus)]
    vr = random.Random(f"{seed}-{index}-{variant}")
    out = []
    for name in FIELDS[:fields]:
        out.append(f"# HELP {name} {name.removeprefix('DCGM_FI_').replace('_', ' ').lower()}.\n# TYPE {name} gauge\n")
        for g, u in enumerate(uuids):
            pod = f'container="pytorch",namespace="ml-training",pod="trainer-{index}-{g // 4}"' if busy[g] else \
                'container="",namespace="",pod=""'
            xid = name == "DCGM_FI_DEV_XID_ERRORS" and (index, g) == XID_GPU
            extra = ',err_code="13",err_msg="Graphics Engine Exception"' if xid else ""
            if name == "DCGM_FI_DEV_XID_ERRORS":
                value = "13" if xid else "0"
            elif name.startswith("DCGM_FI_PROF_") and name.endswith("ACTIVE"):
                value = f"{vr.uniform(0.5, 1) if busy[g] else 0.0:.6f}"
            else:
                low, high = _RANGES.get(name, ((0, 0), (0, 0)))[busy[g]]
                value = str(vr.randint(low, high))
            out.append(f'{name}{{gpu="{g}",UUID="{u}",pci_bus_id="00000000:{0x18 + g * 0x10:02X}:00.0",'
                       f'device="nvidia{g}",modelName="{MODEL}",Hostname="{host}",DCGM_FI_DRIVER_VERSION="{DRIVER}",'
                       f'{pod}{extra}}} {value}\n')
    return "".join(out).encode()


class FakeExporter:
    """Serve `targets` fake hosts on one port; each request of a target gets the next variant."""

    def __init__(self, targets: int = 4, gpus: int = 8, fields: int = 10, *, variants: int = 4, seed: int = 0):
        self.bodies = [[render_target(i, gpus, fields, v, seed) for v in range(variants)] for i in range(targets)]
        self.hits = [0] * targets

    def body(self, path: str) -> bytes | None:
        if path in ("/metrics", "/"):
            index = 0
        else:
            parts = path.strip("/").split("/")
            if len(parts) != 3 or parts[0] != "target" or parts[2] != "metrics" or not parts[1].isdigit():
                return None
            index = int(parts[1])
            if index >= len(self.bodies):
                return None
        variants = self.bodies[index]
        self.hits[index] += 1
        return variants[self.hits[index] % len(variants)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode(errors="replace").split("?", 1)[0]
                body = self.body(path)
                status = b"200 OK" if body is not None else b"404 Not Found"
                body = body if body is not None else b"not found\n"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self._serve, host, port, backlog=4096)
        log.info("Fake dcgm-exporter: %d targets on http://%s:%d/target/<i>/metrics", len(self.bodies), host, port)
        if ready is not None:
            ready.set()
        async with server:
            await server.serve_forever()


def target_urls(base: str, targets: int) -> list[str]:
    """The URLs of the `targets` fake hosts served at `base` (http://host:port)."""
    return [f"{base}/target/{i}/metrics" for i in range(targets)]
