"""Podman helpers for the container tests: build the two images once (k8s/scripts/build-image.sh, from a
clean copy of the checkout) and run them the way the chart runs its pods."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "k8s" / "scripts" / "build-image.sh"
# podman settings this kind of machine needs (see k8s/README.md); an exported CONTAINERS_CONF wins
CONTAINERS_CONF = REPO / "k8s" / "podman-containers.conf"
# the base image: no registry is reachable from CI, so by default the Debian base that build-image.sh
# makes with mmdebstrap (kept in podman's store, so it is built once per machine)
BASE = os.environ.get("TELEMETRY_IMAGE_BASE", "debian-local")

# What the chart's pods get: non-root, read-only root filesystem, only /tmp writable, no capabilities.
HARDENED = ["--user", "10001:10001", "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
# The chart's ConfigMap: the root filesystem is read-only, so everything writes under /tmp
# (test_image.py checks these against templates/configmap.yaml).
CHART_ENV = {"TELEMETRY_NB_HOME": "/tmp/telemetry-nb", "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache",
             "JUPYTER_RUNTIME_DIR": "/tmp/jupyter/runtime", "JUPYTER_DATA_DIR": "/tmp/jupyter/data",
             "IPYTHONDIR": "/tmp/ipython", "MPLCONFIGDIR": "/tmp/matplotlib", "PYTHONUNBUFFERED": "1"}


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def runtime() -> str | None:
    """runc where installed: crun refuses this machine's hybrid cgroup layout."""
    return os.environ.get("PODMAN_RUNTIME") or ("runc" if shutil.which("runc") else None)


def podman_argv(*args: str) -> list[str]:
    rt = runtime()
    return ["podman", *(["--runtime", rt] if rt else []), *args]


def podman(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(podman_argv(*args), capture_output=True, text=True, timeout=timeout, env=podman_env(),
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def clean_checkout(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files git does not ignore): no venv, no build outputs."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build(context: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """k8s/scripts/build-image.sh of the checkout at `context` with podman (its own Dockerfile unless given)."""
    rt = runtime()
    argv = ["bash", str(context / "k8s" / "scripts" / "build-image.sh"), "--engine", "podman", "--base", BASE,
            *(["--podman-runtime", rt] if rt else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=podman_env(),
                          stdin=subprocess.DEVNULL)


def image_size_mb(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref, check=True).stdout.strip()) // 1_000_000


@dataclass
class Images:
    services: str
    notebooks: str
    context: Path
    build_s: float
    sizes_mb: dict[str, int] = field(default_factory=dict)


def run_role(image: str, *args: str, env: dict[str, str] | None = None, volumes: tuple[str, ...] = (),
             network: str = "host", options: tuple[str, ...] = (),
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`podman run` one role to completion, hardened like the chart's pods."""
    return podman("run", "--rm", *HARDENED, f"--network={network}", *_env_args(env), *_vol_args(volumes),
                  *options, image, *args, timeout=timeout)


def _env_args(env: dict[str, str] | None) -> list[str]:
    out: list[str] = []
    for k, v in {**CHART_ENV, **(env or {})}.items():
        out += ["--env", f"{k}={v}"]
    return out


def _vol_args(volumes: tuple[str, ...]) -> list[str]:
    return [f"--volume={v}" for v in volumes]


class Container:
    """A detached container (`podman run -d`), removed on `stop()`."""

    def __init__(self, image: str, *args: str, env: dict[str, str] | None = None, volumes: tuple[str, ...] = (),
                 network: str = "host", name: str | None = None):
        self.name = name or f"tnb-{uuid.uuid4().hex[:8]}"
        podman("run", "-d", "--name", self.name, *HARDENED, f"--network={network}", *_env_args(env),
               *_vol_args(volumes), image, *args, check=True)

    def logs(self) -> str:
        proc = podman("logs", self.name, timeout=60)
        return proc.stdout + proc.stderr

    def running(self) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", self.name, timeout=60)
        return proc.stdout.strip() == "true"

    def wait(self, timeout: float = 300) -> int:
        return int(podman("wait", self.name, timeout=timeout, check=True).stdout.strip().splitlines()[-1])

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, timeout=timeout)

    def http_status(self, url: str) -> int | None:
        """GET `url` from inside the container (its own network namespace and tools); None when unreachable."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
                "except urllib.error.HTTPError as e:\n    print(e.code)\n"
                "except OSError:\n    print('none')\n")
        out = self.exec("python", "-c", code, url).stdout.strip()
        return int(out) if out.isdigit() else None

    def wait_http(self, url: str, timeout_s: float = 60, ok: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + timeout_s
        while self.http_status(url) not in ok:
            if time.monotonic() > deadline or not self.running():
                raise AssertionError(f"{url} did not answer {ok} in {self.name}:\n{self.logs()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, timeout=60)
