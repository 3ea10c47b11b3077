"""Per-project rate quotas at Google's defaults, one helper for every emulator.

Google counts API rate quotas per consumer project in synchronized one-minute intervals: "if a
project reaches a quota limit at 10:00:15, the quota refills at the start of the next synchronized
interval, such as 10:01:00" (Compute Engine rate quotas page). Every emulator charges each call
to one quota group before doing anything; over the limit it answers exactly as its real API does:

- Secret Manager: 429 RESOURCE_EXHAUSTED, "Quota exceeded for quota metric 'Write requests' and
  limit 'Write requests per minute' of service 'secretmanager.googleapis.com' for consumer
  'project_number:N'." with an ErrorInfo detail (reason RATE_LIMIT_EXCEEDED). Defaults per project
  per minute: 600 reads (list, get, getIamPolicy), 600 writes (any mutation, IAM included), 90,000
  accesses.
- Compute Engine: 403 with `errors[].reason` rateLimitExceeded and the same sentence for
  'compute.googleapis.com'. Defaults (the documented per-project groups): 1,500 "Queries"
  (mutations), 1,500 "Read requests" (get), 1,500 "List requests" (list, aggregatedList),
  1,500 "Operation read requests" (operations get/wait).

`time_factor` (SandboxConfig.time_factor, env MESHJOIN_SANDBOX_TIME_FACTOR) scales the interval
(0.1 makes it six seconds) so a test can see a quota refill without waiting a minute; the limits
stay Google's. Quotas are never switched off.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .web import ApiError

MINUTE = 60.0


@dataclass(frozen=True)
class QuotaGroup:
    """One quota: its metric's display name, Google's id of the metric, and the default limit."""

    metric: str  # "Read requests"
    metric_id: str  # "secretmanager.googleapis.com/read_requests"
    limit_id: str  # "ReadRequestsPerMinutePerProject"
    limit: int


SECRET_MANAGER = "secretmanager.googleapis.com"
COMPUTE = "compute.googleapis.com"

SECRET_MANAGER_GROUPS = {
    "reads": QuotaGroup("Read requests", f"{SECRET_MANAGER}/read_requests", "ReadRequestsPerMinutePerProject", 600),
    "writes": QuotaGroup("Write requests", f"{SECRET_MANAGER}/write_requests", "WriteRequestsPerMinutePerProject",
                         600),
    "accesses": QuotaGroup("Access requests", f"{SECRET_MANAGER}/access_requests",
                           "AccessRequestsPerMinutePerProject", 90_000),
}
COMPUTE_GROUPS = {
    "writes": QuotaGroup("Queries", f"{COMPUTE}/default", "defaultPerMinutePerProject", 1500),
    "reads": QuotaGroup("Read requests", f"{COMPUTE}/read_requests", "ReadRequestsPerMinutePerProject", 1500),
    "lists": QuotaGroup("List requests", f"{COMPUTE}/list_requests", "ListRequestsPerMinutePerProject", 1500),
    "operation_reads": QuotaGroup("Operation read requests", f"{COMPUTE}/operation_read_requests",
                                  "OperationReadRequestsPerMinutePerProject", 1500),
}

# Which group each emulated method is charged to.
SECRET_MANAGER_METHODS = {
    "secrets.list": "reads", "secrets.get": "reads", "secrets.getIamPolicy": "reads",
    "secrets.versions.list": "reads", "secrets.versions.get": "reads", "secrets.testIamPermissions": "reads",
    "secrets.versions.access": "accesses",
}  # everything else is a write
COMPUTE_METHODS = {
    "instances.get": "reads", "instances.getGuestAttributes": "reads", "projects.get": "reads",
    "instances.list": "lists", "instances.aggregatedList": "lists",
    "zoneOperations.get": "operation_reads", "zoneOperations.wait": "operation_reads",
    "globalOperations.get": "operation_reads", "globalOperations.wait": "operation_reads",
}  # everything else is a write ("Queries")


def time_factor_from_env(environ) -> float:
    """MESHJOIN_SANDBOX_TIME_FACTOR as a positive float (default 1: Google's own minute)."""
    raw = environ.get("MESHJOIN_SANDBOX_TIME_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"MESHJOIN_SANDBOX_TIME_FACTOR must be a positive number, got {raw!r}") from None
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"MESHJOIN_SANDBOX_TIME_FACTOR must be a positive number, got {raw!r}")
    return factor


class RateQuotas:
    """Fixed, synchronized windows of `MINUTE * time_factor` seconds per (project, group). Thread-safe.

    `clock` is injectable (seconds, monotonic or wall) so tests step time instead of sleeping.
    """

    def __init__(self, service: str, groups: dict[str, QuotaGroup], methods: dict[str, str],
                 default_group: str = "writes", time_factor: float = 1.0,
                 clock: Callable[[], float] = time.time):
        self.service = service
        self.groups = groups
        self.methods = methods
        self.default_group = default_group
        self.window = MINUTE * time_factor
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}  # (project, group) -> (interval, used)
        self.refused: dict[str, int] = {}

    def group_of(self, method: str) -> str:
        return self.methods.get(method, self.default_group)

    def charge(self, project_number: str, method: str) -> QuotaGroup | None:
        """Count one call of `method`; answers the exhausted group (the call is refused) or None."""
        name = self.group_of(method)
        group = self.groups[name]
        interval = int(self.clock() // self.window)
        with self._lock:
            seen, used = self._counts.get((project_number, name), (interval, 0))
            if seen != interval:
                used = 0
            if used >= group.limit:
                self._counts[(project_number, name)] = (interval, used)
                self.refused[name] = self.refused.get(name, 0) + 1
                return group
            self._counts[(project_number, name)] = (interval, used + 1)
        return None

    def message(self, group: QuotaGroup, project_number: str) -> str:
        return (f"Quota exceeded for quota metric '{group.metric}' and limit '{group.metric} per minute' of "
                f"service '{self.service}' for consumer 'project_number:{project_number}'.")

    def error_info(self, group: QuotaGroup, project_number: str) -> list[dict]:
        """The `google.rpc.ErrorInfo` detail Google attaches to a quota refusal."""
        return [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "RATE_LIMIT_EXCEEDED",
            "domain": "googleapis.com",
            "metadata": {"consumer": f"projects/{project_number}", "quota_metric": group.metric_id,
                         "quota_limit": group.limit_id, "quota_limit_value": str(group.limit),
                         "quota_location": "global", "service": self.service},
        }]


def secret_manager_quotas(time_factor: float = 1.0, clock: Callable[[], float] = time.time) -> RateQuotas:
    return RateQuotas(SECRET_MANAGER, SECRET_MANAGER_GROUPS, SECRET_MANAGER_METHODS, "writes", time_factor, clock)


def compute_quotas(time_factor: float = 1.0, clock: Callable[[], float] = time.time) -> RateQuotas:
    return RateQuotas(COMPUTE, COMPUTE_GROUPS, COMPUTE_METHODS, "writes", time_factor, clock)


def limiter(quotas: RateQuotas, world, status: int, reason: str):
    """A RoutedApp `limiter`: charge the call's method; over quota, raise the API's own refusal."""

    def check(request, endpoint: str) -> None:
        group = quotas.charge(world.project_number, endpoint)
        if group is not None:
            raise ApiError(status, quotas.message(group, world.project_number), reason,
                           details=quotas.error_info(group, world.project_number))

    return check
