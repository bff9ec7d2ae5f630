"""A userspace TCP relay for tests: forwards to a real server, can add delay, and can be cut and restored.

It stands in for a network path (this kernel has no netem): `cut()` drops every connection and
refuses new ones, as an outage would; `delay_s` holds each chunk that long before forwarding it.
"""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time


class Relay:
    """Listen on `listen` (host, port; port 0 picks one) and forward to `target`."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 delay_s: float = 0.0, jitter_s: float = 0.0):
        self.target = target
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.2)
        self.address = self._server.getsockname()[:2]
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay-accept")
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def url(self, scheme: str, path: str = "") -> str:
        return f"{scheme}://{self.address[0]}:{self.port}{path}"

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""
        self._up.clear()
        with self._lock:
            for s in list(self._conns):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._conns.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            a.setblocking(True)
            b.setblocking(True)
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while self._up.is_set() and not self._closed.is_set():
                for key, _ in sel.select(timeout=0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if self.delay_s or self.jitter_s:
                        time.sleep(max(0.0, self.delay_s + random.uniform(-self.jitter_s, self.jitter_s)))
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
