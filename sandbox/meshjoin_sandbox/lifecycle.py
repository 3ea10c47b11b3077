"""How long things take in the sandbox's Compute Engine: VM states and operations over time.

Real GCE (instance life cycle page): insert and start go PROVISIONING -> STAGING -> RUNNING, typically
10-60 s for a stock image; stop goes STOPPING -> TERMINATED (up to 90 s of guest shutdown); reset is a
hard reset that leaves the VM RUNNING and boots the guest again. Mutation operations are answered
RUNNING and finish some seconds later (setLabels/setMetadata usually 1-5 s, insert when the VM is up).
`zoneOperations.wait` holds "no more than the 2 minutes and then returns the current state of the
operation, which might be DONE or still in progress" (API reference).

The sandbox keeps the same shape on a shorter clock, configured by `Timing` (SandboxConfig
`boot_seconds`, `stop_seconds`, `operation_seconds`, `time_factor`). At each boot (RUNNING after
insert, start or reset) the guest runs its startup script: see guest.py.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .web import ApiError

log = logging.getLogger("sandbox.lifecycle")

# GCE's own limit on how long zoneOperations.wait holds a request.
WAIT_LIMIT_SECONDS = 120.0


@dataclass
class Timing:
    """Delays of the emulated Compute Engine (seconds). Short defaults keep tests fast; see README."""

    boot_seconds: float = 0.5  # insert/start until RUNNING (real: ~10-60 s); STAGING after 40 % of it
    stop_seconds: float = 0.3  # stop until TERMINATED (real: up to ~90 s)
    operation_seconds: float = 0.3  # a metadata/label mutation's operation until DONE (real: ~1-5 s)
    time_factor: float = 1.0  # scales quota windows and the wait limit (1 = Google's minute, 2 minutes)

    @property
    def wait_limit(self) -> float:
        return WAIT_LIMIT_SECONDS * self.time_factor


class VmLifecycle:
    """Moves instances of one ComputeEmulator through their states on timers.

    Every transition is applied under `world.lock` and only if the VM is still the same incarnation
    (same id) in the same phase (a stop during boot, or a delete, cancels the rest of the boot).
    `on_boot(zone, name)` is called (outside the lock, on the timer thread) each time a VM reaches
    RUNNING by a boot; `history` keeps every (zone, name, status) transition for tests and tools.
    """

    def __init__(self, compute, timing: Timing, on_boot: Callable[[str, str], None] | None = None):
        self.compute = compute
        self.timing = timing
        self.on_boot = on_boot or (lambda zone, name: None)
        self._phase: dict[tuple[str, str], int] = {}
        self._phases = itertools.count(1)  # unique across VMs, so a re-created VM ignores old timers
        # Transitions whose timer has not fired yet: [due (monotonic), phase, status, boot, fired]. A busy
        # machine can run a timer late; `catch_up` applies the overdue ones before an operation says DONE.
        self._pending: dict[tuple[str, str], list[list]] = {}
        self._fire_lock = threading.Lock()
        self.history: list[tuple[str, str, str]] = []

    # ---- called by the emulator with world.lock held ------------------------------------------------

    def created(self, zone: str, name: str) -> float:
        """A new VM: PROVISIONING now, STAGING, then RUNNING. Answers the seconds until RUNNING."""
        return self._boot(zone, name)

    def stop(self, zone: str, name: str) -> float:
        instance = self.compute._must_get(zone, name)
        if instance["status"] in ("TERMINATED", "STOPPING"):
            return 0.0
        phase = self._next_phase(zone, name)
        self._set(zone, name, instance, "STOPPING")
        self._later(self.timing.stop_seconds, zone, name, phase, "TERMINATED")
        return self.timing.stop_seconds

    def start(self, zone: str, name: str) -> float:
        instance = self.compute._must_get(zone, name)
        if instance["status"] != "TERMINATED":
            if instance["status"] == "STOPPING":
                raise ApiError(400, f"The resource '{self._path(zone, name)}' is not ready", "resourceNotReady")
            return 0.0  # starting a running VM does nothing, as on GCE
        return self._boot(zone, name)

    def reset(self, zone: str, name: str) -> float:
        instance = self.compute._must_get(zone, name)
        if instance["status"] != "RUNNING":
            raise ApiError(400, f"The resource '{self._path(zone, name)}' is not ready", "resourceNotReady")
        phase = self._next_phase(zone, name)
        delay = self.timing.boot_seconds / 2
        self._later(delay, zone, name, phase, "RUNNING", boot=True)
        return delay

    def deleted(self, zone: str, name: str) -> None:
        self._phase.pop((zone, name), None)

    # ---- internals ----------------------------------------------------------------------------------

    def _path(self, zone: str, name: str) -> str:
        return f"projects/{self.compute.project}/zones/{zone}/instances/{name}"

    def _next_phase(self, zone: str, name: str) -> int:
        phase = next(self._phases)
        self._phase[(zone, name)] = phase
        return phase

    def _boot(self, zone: str, name: str) -> float:
        instance = self.compute._must_get(zone, name)
        phase = self._next_phase(zone, name)
        self._set(zone, name, instance, "PROVISIONING")
        boot = self.timing.boot_seconds
        self._later(boot * 0.4, zone, name, phase, "STAGING")
        self._later(boot, zone, name, phase, "RUNNING", boot=True)
        return boot

    def _set(self, zone: str, name: str, instance: dict, status: str) -> None:
        instance["status"] = status
        self.history.append((zone, name, status))

    def _later(self, delay: float, zone: str, name: str, phase: int, status: str, boot: bool = False) -> None:
        entry = [time.monotonic() + max(delay, 0.0), phase, status, boot, False]
        with self._fire_lock:
            self._pending.setdefault((zone, name), []).append(entry)
        timer = threading.Timer(max(delay, 0.0), self._fire, (zone, name, entry))
        timer.daemon = True
        timer.start()

    def _fire(self, zone: str, name: str, entry: list) -> None:
        """Apply one scheduled transition, once, whoever gets there first (its timer or `catch_up`)."""
        with self._fire_lock:
            if entry[4]:
                return
            entry[4] = True
            pending = self._pending.get((zone, name), [])
            if entry in pending:
                pending.remove(entry)
        self._transition(zone, name, entry[1], entry[2], entry[3])

    def catch_up(self, zone: str, name: str) -> None:
        """Apply the VM's transitions that are due but whose timers have not run yet (call without
        world.lock): an operation that is DONE by the clock must not show a VM still on its way."""
        now = time.monotonic()
        with self._fire_lock:
            due = sorted((e for e in self._pending.get((zone, name), []) if e[0] <= now), key=lambda e: e[0])
        for entry in due:
            self._fire(zone, name, entry)

    def _transition(self, zone: str, name: str, phase: int, status: str, boot: bool) -> None:
        with self.compute.world.lock:
            instance = self.compute._instances.get((zone, name))
            if instance is None or self._phase.get((zone, name)) != phase:
                return
            self._set(zone, name, instance, status)
            stamp = self.compute.stamp()
            if status == "RUNNING":
                instance["lastStartTimestamp"] = stamp
            elif status == "TERMINATED":
                instance["lastStopTimestamp"] = stamp
        if boot:
            try:
                self.on_boot(zone, name)
            except Exception:  # a broken guest never breaks the emulator
                log.exception("boot hook of %s/%s failed", zone, name)


class OperationClock:
    """When each operation is DONE; `wait` holds until then or the (scaled) two-minute limit."""

    def __init__(self, timing: Timing):
        self.timing = timing
        self._done_at: dict[tuple[str, str], float] = {}
        self._changed = threading.Condition()

    def started(self, scope: str, name: str, seconds: float) -> None:
        self._done_at[(scope, name)] = time.monotonic() + max(seconds, 0.0)

    def remaining(self, scope: str, name: str) -> float:
        return self._done_at.get((scope, name), 0.0) - time.monotonic()

    def is_done(self, scope: str, name: str) -> bool:
        return time.monotonic() >= self._done_at.get((scope, name), 0.0)

    def hold(self, scope: str, name: str) -> None:
        """Block (outside any lock) until the operation is done or the wait limit passes."""
        deadline = time.monotonic() + self.timing.wait_limit
        done_at = self._done_at.get((scope, name), 0.0)
        with self._changed:
            while time.monotonic() < min(done_at, deadline):
                self._changed.wait(min(done_at, deadline) - time.monotonic())
