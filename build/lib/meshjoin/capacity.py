"""How much per-VM work the fleet's quotas allow: a pure model, no I/O.

The sweep plans; the events function's instances do the work it publishes (one Pub/Sub message per
VM action). Every API they call is rate-limited per project and minute, and the same quotas must also
carry event traffic (new VMs, label changes, the agents' nudges) and people's own calls. So one sweep
publishes at most `sweep_work_budget(settings)` works: what `MESHJOIN_SWEEP_WORK_SHARE` of the tightest
quota allows over one `MESHJOIN_SWEEP_INTERVAL`, at the calls each kind of work is measured to make.

Default quotas (per project and minute unless said otherwise):

- Compute Engine rate quotas, https://cloud.google.com/compute/api-quota (the published quota groups:
  "Queries" / `compute.googleapis.com/default` for mutations, `read_requests` for `*.get`,
  `list_requests` for `*.list`, `operation_read_requests` for operation gets and waits, 1,500 a
  minute each; `filtered_list_cost_overhead`, 750,000 filtered resources a minute, charged on top of
  `list_requests` by lists with a filter). The page also describes newer "simplified" metrics
  (global and per-region reads and writes) with higher limits; 1,500 is the conservative floor, and
  a project with raised quotas sets `MESHJOIN_COMPUTE_READS_PER_MINUTE` / `_WRITES_PER_MINUTE`.
  Zonal methods count per region under the newer metrics: a fleet spread over regions has more room
  than modelled here. Over quota: 403 `rateLimitExceeded`.
- Secret Manager, https://cloud.google.com/secret-manager/quotas: 600 reads, 600 writes, 90,000
  accesses a minute.
- Kubernetes API Priority and Fairness (a concurrency limit, not a rate): kube-apiserver's total
  concurrency is `--max-requests-inflight` (400) + `--max-mutating-requests-inflight` (200) = 600 seats
  by default, split among the limited priority levels by their nominal concurrency shares; the
  functions authenticate as a Google account (a user in `system:authenticated`, not a Kubernetes
  service account), so the `global-default` FlowSchema puts them in the `global-default` level: 20 of
  245 shares (catch-all 5, system 30, node-high 40, leader-election 10, workload-high 40, workload-low
  100, global-default 20; kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/apis/flowcontrol/
  bootstrap/default.go; https://kubernetes.io/docs/concepts/cluster-administration/flow-control/),
  i.e. ceil(600 x 20 / 245) = 49 seats. Seats become a rate through the time a request holds one:
  `KUBE_SECONDS_PER_CALL` (an assumption: small gets, creates and replaces of a few hundred bytes).
  GKE sizes its control planes itself, so these are upstream defaults, not GKE's figures.

Calls per work come from BENCHMARKS.md ("A join, a renewal, a key rotation: API calls by kind", the
emulators' own counters), counting every pass the work causes: a renewal is meshjoin's pass (the
VM's CSR read, the chain written, the entry's expiry annotation) plus the pass of the VM's report
that follows it (its nudge); a join is three passes; every `MESHJOIN_KEY_ROTATION_RENEWALS`-th renewal
adds a key rotation (the new key's CSR pass and its report's pass).
"""

from __future__ import annotations

import math
from datetime import timedelta

# Quota dimensions: (api, kind).
COMPUTE_READ = ("compute", "read")  # instances.get, instances.getGuestAttributes, projects.get
COMPUTE_WRITE = ("compute", "write")  # instances.setMetadata
COMPUTE_OPERATION_READ = ("compute", "operation_read")  # zoneOperations.wait
COMPUTE_LIST = ("compute", "list")  # instances.aggregatedList (the sweep's inventory)
COMPUTE_FILTERED_LIST_COST = ("compute", "filtered_list_cost")  # resources a filtered list scans
SECRETS_READ = ("secretmanager", "read")
SECRETS_WRITE = ("secretmanager", "write")
SECRETS_ACCESS = ("secretmanager", "access")
KUBE_CALLS = ("kubernetes", "calls")

# Kubernetes APF defaults (see the module docstring).
KUBE_SERVER_CONCURRENCY = 400 + 200
KUBE_SHARES_TOTAL = 5 + 30 + 40 + 10 + 40 + 100 + 20
KUBE_GLOBAL_DEFAULT_SHARES = 20
KUBE_SEATS = math.ceil(KUBE_SERVER_CONCURRENCY * KUBE_GLOBAL_DEFAULT_SHARES / KUBE_SHARES_TOTAL)  # 49
KUBE_SECONDS_PER_CALL = 0.25  # assumed; generous for single-object calls

DEFAULT_QUOTAS: dict[tuple[str, str], float] = {
    COMPUTE_READ: 1500,
    COMPUTE_WRITE: 1500,
    COMPUTE_OPERATION_READ: 1500,
    COMPUTE_LIST: 1500,
    COMPUTE_FILTERED_LIST_COST: 750_000,
    SECRETS_READ: 600,
    SECRETS_WRITE: 600,
    SECRETS_ACCESS: 90_000,
    KUBE_CALLS: KUBE_SEATS * 60 / KUBE_SECONDS_PER_CALL,  # 11,760 calls a minute at full use of the seats
}

# Kinds of per-VM work the sweep publishes (the `work` field of its messages), and a key rotation,
# which follows every MESHJOIN_KEY_ROTATION_RENEWALS-th renewal by itself (the agent's CSR and nudge).
JOIN, RENEW, REISSUE, PRUNE, ROTATION = "join", "renew", "reissue", "prune", "rotation"
WORK_KINDS = (JOIN, RENEW, REISSUE, PRUNE)

# Calls per work, all passes it causes (BENCHMARKS.md, bench/results.json; means, rounded up).
_RENEWAL = {  # renewal pass (7.0) + the VM's report pass (6.0)
    COMPUTE_READ: 4,  # instances.get + getGuestAttributes, in each pass
    COMPUTE_WRITE: 2,  # setMetadata: the chain; the status with the confirmed serial
    COMPUTE_OPERATION_READ: 2,  # each setMetadata's operation wait
    KUBE_CALLS: 5,  # get WorkloadEntry and ServiceAccount in each pass; one replace of the entry
}
CALLS_PER_WORK: dict[str, dict[tuple[str, str], float]] = {
    # 16.37 calls in 3 passes (bootstrap, certificate, confirmation).
    JOIN: {COMPUTE_READ: 6.07, COMPUTE_WRITE: 3, COMPUTE_OPERATION_READ: 3, KUBE_CALLS: 4,
           SECRETS_READ: 0.07, SECRETS_ACCESS: 0.23},
    RENEW: dict(_RENEWAL),
    REISSUE: dict(_RENEWAL),  # the same pass, from the new CA
    # An entry whose VM is gone or unlabelled: the VM read (404), the owned entries listed and deleted,
    # the Service checked (get, and a list of what still selects it).
    PRUNE: {COMPUTE_READ: 1, KUBE_CALLS: 5},
    # A key rotation: the new key's CSR pass (6.9) and its report's pass (6.0).
    ROTATION: {COMPUTE_READ: 4, COMPUTE_WRITE: 2, COMPUTE_OPERATION_READ: 2, KUBE_CALLS: 5},
}


def quotas(settings) -> dict[tuple[str, str], float]:
    """The defaults, with the project's own figures where the settings name them."""
    return {
        **DEFAULT_QUOTAS,
        COMPUTE_READ: settings.compute_reads_per_minute,
        COMPUTE_WRITE: settings.compute_writes_per_minute,
        SECRETS_READ: settings.secretmanager_reads_per_minute,
        SECRETS_WRITE: settings.secretmanager_writes_per_minute,
    }


def calls_per_work(settings, kind: str) -> dict[tuple[str, str], float]:
    """Calls one work of `kind` makes; a renewal or re-issue carries its share of key rotations."""
    calls = dict(CALLS_PER_WORK[kind])
    if kind in (RENEW, REISSUE) and settings.key_rotation_renewals > 0:
        for dimension, count in CALLS_PER_WORK[ROTATION].items():
            calls[dimension] = calls.get(dimension, 0) + count / settings.key_rotation_renewals
    return calls


def works_per_minute(settings, kind: str, share: float | None = None) -> float:
    """Works of `kind` a minute within `share` (default MESHJOIN_SWEEP_WORK_SHARE) of every quota."""
    share = settings.sweep_work_share if share is None else share
    limits = quotas(settings)
    return min(limits[dimension] * share / count
               for dimension, count in calls_per_work(settings, kind).items() if count > 0)


def bottleneck(settings, kind: str) -> tuple[str, str]:
    """The quota that bounds `kind` first."""
    limits = quotas(settings)
    return min(((limits[d] / c, d) for d, c in calls_per_work(settings, kind).items() if c > 0))[1]


def work_cost(settings, kind: str) -> float:
    """What one work of `kind` takes out of the sweep's budget, in renewals (the budget's unit)."""
    return works_per_minute(settings, RENEW) / works_per_minute(settings, kind)


def sweep_work_budget(settings) -> int:
    """Renewal-equivalents one sweep may publish: the paced rate over one sweep interval, lowered to
    MESHJOIN_SWEEP_RENEWALS when that optional cap is set. A join costs `work_cost(JOIN)` of it."""
    budget = int(works_per_minute(settings, RENEW) * settings.sweep_interval.total_seconds() / 60)
    if settings.sweep_renewals is not None:
        budget = min(budget, settings.sweep_renewals)
    return max(1, budget)


def mean_renewal_period(settings) -> timedelta:
    """How often one VM is renewed on average: at RENEW_FRACTION of the lifetime minus a jitter spread
    evenly over [0, RENEW_JITTER] of it."""
    return settings.cert_ttl * (settings.renew_fraction - settings.renew_jitter_fraction / 2)


def renewals_per_hour(settings) -> float:
    """Renewals an hour the sweep's budget sustains (one budget per interval)."""
    return sweep_work_budget(settings) * 3600 / settings.sweep_interval.total_seconds()


def sustainable_fleet(settings) -> int:
    """The largest fleet (per VM project: Compute's quotas are per project) whose renewals fit the
    budget in the steady state: renewals needed per hour = fleet / mean renewal period."""
    return int(renewals_per_hour(settings) * mean_renewal_period(settings).total_seconds() / 3600)


def quota_use(settings, works: dict[str, float], minutes: float) -> dict[tuple[str, str], float]:
    """Share of each quota that `works` (kind -> count) use when spread over `minutes`."""
    limits = quotas(settings)
    use: dict[tuple[str, str], float] = {d: 0.0 for d in limits}
    for kind, count in works.items():
        for dimension, calls in calls_per_work(settings, kind).items():
            use[dimension] += count * calls / minutes / limits[dimension]
    return use


def events_aggregate_share(max_instances: int, quota_share: float) -> float:
    """The most of a quota the events function's instances may take together: each paces itself to
    MESHJOIN_QUOTA_SHARE (adapters/ratelimit.py). Terraform checks it stays <= 1 - MESHJOIN_QUOTA_RESERVE."""
    return max_instances * quota_share
