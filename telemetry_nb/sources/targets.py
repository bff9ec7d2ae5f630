"""Where the exporters are: static URLs, a file of URLs (re-read on change), or Kubernetes discovery.

Kubernetes discovery works like Prometheus' `kubernetes_sd`: list the exporter pods (or the
EndpointSlices of the exporter's Service) in one namespace with a label selector, then watch
them, so targets follow pods that come and go. A watch that ends is resumed from the last
resourceVersion; one the API server expired (410 Gone) or that fails starts over with a list.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from telemetry_nb.backoff import Backoff

log = logging.getLogger(__name__)
DEFAULT_PORT = 9400


class Targets(Protocol):
    """Anything that can say, right now, which URLs to scrape."""

    def current(self) -> list[str]: ...


def normalize(url: str) -> str:
    """`host:port` or a URL without a path → `http://host:port/metrics`."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    if "/" not in rest:
        rest += "/metrics"
    return f"{scheme}://{rest}"


class StaticTargets:
    """A fixed list of URLs (`--target`)."""

    def __init__(self, urls: list[str]):
        self.urls = [normalize(u) for u in urls]

    def current(self) -> list[str]:
        return list(self.urls)


class FileTargets:
    """One URL a line (`#` comments, blank lines ignored), re-read whenever the file changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._urls: list[str] = []

    def current(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp is not None:
                log.warning("Targets file %s unreadable (%s); keeping the last %d targets", self.path,
                            err.strerror, len(self._urls))
                self._stamp = None
            return list(self._urls)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            lines = self.path.read_text().splitlines()
            urls = [normalize(line.split("#", 1)[0]) for line in lines if line.split("#", 1)[0].strip()]
            if urls != self._urls:
                log.info("Targets file %s: %d targets", self.path, len(urls))
            self._urls, self._stamp = urls, stamp
        return list(self._urls)


class KubernetesTargets:
    """Exporter pods (or EndpointSlice endpoints) of one namespace, listed then watched in a thread.

    `api` is a `kubernetes.client.ApiClient`; in a pod, `kubernetes_client()` builds one from the
    service account, elsewhere from the kubeconfig.
    """

    def __init__(self, api: Any, *, namespace: str = "gpu-operator", selector: str = "app=nvidia-dcgm-exporter",
                 port: int = DEFAULT_PORT, role: str = "pod", field_selector: str = "",
                 watch_timeout_s: int = 300, retry_max_s: float = 30.0):
        from kubernetes import client

        if role not in ("pod", "endpointslice"):
            raise ValueError(f"role must be 'pod' or 'endpointslice', got {role!r}")
        self.namespace, self.selector, self.port, self.role = namespace, selector, port, role
        self.field_selector = field_selector
        self.watch_timeout_s = watch_timeout_s
        self.retry_max_s = retry_max_s
        if role == "pod":
            self._list: Callable = client.CoreV1Api(api).list_namespaced_pod
        else:
            self._list = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice
        self._objects: dict[str, list[str]] = {}  # object name → its target URLs
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> KubernetesTargets:
        self._thread = threading.Thread(target=self._run, daemon=True, name="k8s-discovery")
        self._thread.start()
        return self

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the first list has been read (so the first scrape does not see zero targets)."""
        return self._synced.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def current(self) -> list[str]:
        with self._lock:
            return sorted({u for urls in self._objects.values() for u in urls})

    # -- objects → targets ---------------------------------------------------------------------
    def _urls_of(self, obj: dict) -> list[str]:
        if self.role == "pod":
            status = obj.get("status") or {}
            ip = status.get("podIP")
            if not ip or status.get("phase") != "Running" or (obj.get("metadata") or {}).get("deletionTimestamp"):
                return []
            return [f"http://{_host(ip)}:{self.port}/metrics"]
        urls = []
        for ep in obj.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            urls += [f"http://{_host(ip)}:{self.port}/metrics" for ip in ep.get("addresses") or []]
        return urls

    def _set(self, name: str, obj: dict | None) -> None:
        urls = self._urls_of(obj) if obj is not None else []
        with self._lock:
            before = self._objects.get(name, [])
            if urls:
                self._objects[name] = urls
            else:
                self._objects.pop(name, None)
        if urls != before:
            log.info("Discovery: %s %s/%s %s", self.role, self.namespace, name,
                     f"→ {', '.join(urls)}" if urls else "gone (no target)")

    # -- list + watch --------------------------------------------------------------------------
    def _kwargs(self) -> dict:
        kw: dict = {"label_selector": self.selector}
        if self.field_selector:
            kw["field_selector"] = self.field_selector
        return kw

    def _relist(self) -> str:
        body = self._list(self.namespace, _preload_content=False, **self._kwargs())
        data = json.loads(body.data)
        objects = {o["metadata"]["name"]: o for o in data.get("items") or []}
        for name in set(self._objects) - set(objects):
            self._set(name, None)
        for name, obj in objects.items():
            self._set(name, obj)
        self._synced.set()
        log.info("Discovery: %d %ss match %r in namespace %s: %d targets", len(objects), self.role, self.selector,
                 self.namespace, len(self.current()))
        return (data.get("metadata") or {}).get("resourceVersion") or "0"

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        backoff = Backoff(self.retry_max_s)
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._relist()
                self._watch = watch.Watch()
                for event in self._watch.stream(self._list, self.namespace, resource_version=rv,
                                                timeout_seconds=self.watch_timeout_s, allow_watch_bookmarks=True,
                                                deserialize=False, **self._kwargs()):
                    obj = event.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event.get("type") == "BOOKMARK":
                        continue
                    name = (obj.get("metadata") or {}).get("name", "")
                    self._set(name, None if event.get("type") == "DELETED" else obj)
                backoff = Backoff(self.retry_max_s)
            except ApiException as err:
                if err.status == 410:
                    log.info("Discovery: watch expired (410 Gone); listing again")
                    rv = ""
                    continue
                self._retry(backoff, err)
                rv = ""
            except Exception as err:  # noqa: BLE001 (API server unreachable, bad answer: retried)
                if self._stop.is_set():
                    return
                self._retry(backoff, err)
                rv = ""

    def _retry(self, backoff: Backoff, err: Exception) -> None:
        delay = backoff.next_delay()
        log.warning("Discovery: Kubernetes API failed (%s: %s); keeping %d targets; retrying in %.1fs",
                    type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "",
                    len(self.current()), delay)
        self._stop.wait(delay)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def kubernetes_client(host: str | None = None) -> Any:
    """An ApiClient: `host` as given (tests, a proxy), in-cluster config in a pod, else the kubeconfig."""
    from kubernetes import client, config

    if host:
        cfg = client.Configuration()
        cfg.host = host
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
