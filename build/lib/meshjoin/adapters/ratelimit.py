"""Client-side pacing inside Google's per-minute API quotas, shared by every thread of a process.

Secret Manager allows 600 reads (list, get, getIamPolicy) and 600 writes (any mutation, IAM
included) per minute per project, 90,000 accesses; meshjoin now only reads the CA there and lists
and deletes legacy per-VM secrets. Compute's rate quotas are per minute too (an older published
default: 1,500 reads and 1,500 mutations), and a renewal costs one getGuestAttributes, one
setMetadata and its operation wait: unpaced, a sweep spends the minute's quota in seconds and every
other caller (the events function joining a new VM) gets 429 until the minute is over. Each process therefore takes at most
`MESHJOIN_QUOTA_SHARE` of each quota. The events function's instances do the sweep's published
work, so together they may take `events max_instances x MESHJOIN_QUOTA_SHARE`, which Terraform keeps
at most `1 - MESHJOIN_QUOTA_RESERVE`; how much work one sweep publishes is the quota model's
(shared/meshjoin/capacity.py, sweep_work_budget).

A token bucket per (API, kind): `capacity` tokens refill at `rate_per_minute / 60` per second; a
call takes one token, waiting for it if none is left. Time and sleep are injected, so the pacing
is tested without waiting.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

# Kinds of call, as the quotas count them.
READ, WRITE, ACCESS = "read", "write", "access"
# Burst allowance: a few seconds' worth of calls, so a single reconcile is never slowed down.
BURST_SECONDS = 5.0


class TokenBucket:
    def __init__(self, rate_per_minute: float, *, burst_seconds: float = BURST_SECONDS,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be positive")
        self.rate_per_second = rate_per_minute / 60.0
        self.capacity = max(1.0, self.rate_per_second * burst_seconds)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = threading.Lock()

    def _reserve(self) -> float:
        """Take one token (possibly going into debt); how long the caller must wait for it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_second)
            self._updated = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_second

    def acquire(self) -> float:
        """Block until a call may go out; returns the seconds waited."""
        delay = self._reserve()
        if delay > 0:
            self._sleep(delay)
        return delay


class Limiters:
    """The process's buckets, keyed by (api, kind); built on first use from the rates given."""

    def __init__(self, rates: dict[tuple[str, str], float], **bucket_options):
        self._rates = dict(rates)
        self._options = bucket_options
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def rate(self, api: str, kind: str) -> float | None:
        return self._rates.get((api, kind))

    def acquire(self, api: str, kind: str) -> float:
        rate = self._rates.get((api, kind))
        if rate is None:
            return 0.0
        with self._lock:
            bucket = self._buckets.get((api, kind))
            if bucket is None:
                bucket = self._buckets[(api, kind)] = TokenBucket(rate, **self._options)
        return bucket.acquire()


def process_rates(settings) -> dict[tuple[str, str], float]:
    """This process's share of each per-minute quota."""
    share = settings.quota_share
    return {
        ("secretmanager", READ): settings.secretmanager_reads_per_minute * share,
        ("secretmanager", WRITE): settings.secretmanager_writes_per_minute * share,
        ("secretmanager", ACCESS): 90_000 * share,
        ("compute", READ): settings.compute_reads_per_minute * share,
        ("compute", WRITE): settings.compute_writes_per_minute * share,
    }


_shared: dict[tuple, Limiters] = {}
_shared_lock = threading.Lock()


def shared_limiters(settings) -> Limiters:
    """One set of buckets per process (per distinct rates): every adapter of the process shares it."""
    rates = process_rates(settings)
    key = tuple(sorted(rates.items()))
    with _shared_lock:
        limiters = _shared.get(key)
        if limiters is None:
            limiters = _shared[key] = Limiters(rates)
        return limiters
