"""A userspace TCP relay for tests: forwards to a real server, can delay traffic, and can be cut and restored.

It stands in for a network path (this kernel has no netem): each direction is a delay line that
holds every chunk `delay_s` (± `jitter_s`, order kept) before sending it on; `cut()` drops every
connection and refuses new ones, as an outage would.

    python -m tests.relay --listen 198.18.1.1:6379 --target 198.18.3.2:6379 --delay 0.025 --jitter 0.005
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
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
        self._server = socket.create_server(listen)
        self._server.settimeout(0.2)
        self.address = self._server.getsockname()[:2]
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

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
                _close(s)
            self._conns.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._server.close()

    def serve_forever(self) -> None:
        self._closed.wait()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._direction, args=(src, dst), daemon=True).start()

    def _direction(self, src: socket.socket, dst: socket.socket) -> None:
        """Read from `src`; a sender thread writes each chunk to `dst` once its delay has passed."""
        line: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()
        done = threading.Event()

        def sender() -> None:
            try:
                while True:
                    with ready:
                        while not line and not done.is_set():
                            ready.wait(0.2)
                        if not line:
                            return
                        due, data = line.popleft()
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                self._drop(src, dst)

        threading.Thread(target=sender, daemon=True).start()
        last_due = 0.0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                delay = max(0.0, self.delay_s + random.uniform(-self.jitter_s, self.jitter_s))
                last_due = max(last_due, time.monotonic() + delay)
                with ready:
                    line.append((last_due, data))
                    ready.notify()
        except OSError:
            pass
        finally:
            done.set()
            with ready:
                ready.notify()

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            self._conns.discard(a)
            self._conns.discard(b)
        _close(a)
        _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description="Delaying TCP relay for network tests")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay per chunk, seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="± jitter, seconds")
    args = parser.parse_args()
    relay = Relay(_addr(args.target), _addr(args.listen), args.delay, args.jitter)
    signal.signal(signal.SIGTERM, lambda *a: relay.close())
    print(f"relay {args.listen} -> {args.target} delay={args.delay}s±{args.jitter}s", flush=True)
    relay.serve_forever()


if __name__ == "__main__":
    main()
