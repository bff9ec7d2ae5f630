"""Retry with capped exponential backoff and a log line that says what we are waiting for."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Delays 0.1 s, 0.2 s, 0.4 s … up to `max_s`, with jitter; `reset()` after a success."""

    def __init__(self, max_s: float = 30.0, base_s: float = 0.1, sleep: Callable[[float], None] = time.sleep):
        self.max_s = max_s
        self.base_s = base_s
        self.sleep = sleep
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.base_s * (2 ** self.attempt))
        self.attempt += 1
        return delay * random.uniform(0.8, 1.0)

    def wait(self) -> float:
        delay = self.next_delay()
        self.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    errors: tuple[type[BaseException], ...],
    log: logging.Logger,
    backoff: Backoff | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    retryable: Callable[[BaseException], bool] = lambda _err: True,
) -> T:
    """Call `fn` until it succeeds, logging `what` we wait for on every failure in `errors` that is `retryable`."""
    backoff = backoff or Backoff()
    while True:
        try:
            result = fn()
        except errors as err:
            if should_stop() or not retryable(err):
                raise
            delay = backoff.next_delay()
            log.warning("%s unavailable (%s: %s); retrying in %.1fs", what, type(err).__name__,
                        str(err).strip().splitlines()[0] if str(err).strip() else "", delay)
            if on_retry is not None:
                on_retry(err)
            backoff.sleep(delay)
            continue
        if backoff.attempt:
            log.info("%s is back after %d retries", what, backoff.attempt)
        backoff.reset()
        return result
