"""Time for tests without waiting for it: a clock that moves when slept on, and Redis entries aged on demand."""

from __future__ import annotations

import redis

START = 1_752_868_800.0  # 2025-07-18T20:00:00Z


class FakeClock:
    """`clock()` reads the time; `sleep(s)` advances it by `s` at once and records `s` in `sleeps`."""

    def __init__(self, start: float = START):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def age_pending(client: redis.Redis, stream: str, group: str, consumer: str, ids: list, idle_ms: int) -> None:
    """Make pending entries of `consumer` look idle for `idle_ms` (XCLAIM … IDLE JUSTID keeps their delivery count).

    Redis measures idleness with its own clock; this sets it instead of sleeping past a visibility timeout.
    """
    client.xclaim(stream, group, consumer, 0, ids, idle=idle_ms, justid=True)
