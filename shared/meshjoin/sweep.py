"""The maintenance sweep: bring the whole fleet to the truth with the per-VM reconcile.

Inventory is paged listings, never a call per VM: labelled VMs (Compute aggregatedList with a
server-side label filter; their metadata carries `meshjoin-status`: keyId, certificate times, CA,
rekey token), meshjoin's WorkloadEntries and Services (label selector), and the legacy per-VM
secrets of meshjoin 2 (Secret Manager label filter). A pure `plan_sweep` turns the inventory into
actions from the statuses alone; only VMs with something to do cost further calls:
- renewals and CA re-issues: the reconcile re-certifies the VM's current key from its CSR (one
  getGuestAttributes, one setMetadata; no Secret Manager call);
- VMs waiting for their agent, with a key rotation pending, or migrating from a per-VM secret: the
  reconcile reads their guest attributes;
- legacy secrets whose VM is gone, unlabelled or migrated (no `meshjoin-secret` item): deleted.
Pruning happens only from complete listings, through a reconcile that sees a definitive 404 or a
missing label, and at most `prune_cap` per sweep.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from . import bootstrap, names, pki
from .adapters.ratelimit import sweep_renewal_budget
from .errors import BadMessage, MeshjoinError
from .events import validated_key
from .logs import log
from .model import JOIN_LABEL, JOIN_VALUE, Denial, Vm, VmKey
from .policy import decide_identity
from .reconcile import STOPPED_STATES, Delivered, Reconciler, is_legacy, needs_new_cert, rekey_pending
from .settings import Settings

LABEL_FILTER = f"labels.{JOIN_LABEL}={JOIN_VALUE}"
# Compute pages at most 500 VMs; the cluster's small objects come in larger pages (fewer list calls).
CLUSTER_PAGE = 5000
OWNED_SELECTOR = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"

# Action kinds, in the order a sweep spends its budget on them.
JOIN, REISSUE, RENEW, PRUNE, PRUNE_SERVICE, PRUNE_SECRET = \
    "join", "reissue", "renew", "prune", "prune-service", "prune-secret"
TO_BE_DENIED = "to be denied"


@dataclass
class Inventory:
    vms: dict[VmKey, Vm]
    entries: list[dict]
    services: list[dict]
    secrets: dict[VmKey, str]  # legacy per-VM secrets (meshjoin 2) by the VM they were made for
    errors: list[str] = field(default_factory=list)
    # Zones the VM listing could not reach (aggregatedList `unreachables`): their VMs are unseen,
    # so nothing of theirs is pruned or re-joined this sweep.
    unreachable_zones: frozenset[str] = frozenset()

    @property
    def complete(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class Action:
    kind: str
    key: VmKey | None
    reason: str
    target: str = ""  # namespace/name for a Service prune

    def describe(self) -> str:
        subject = str(self.key) if self.key else self.target
        return f"{self.kind} {subject}: {self.reason}"


@dataclass
class SweepPlan:
    actions: list[Action]
    denied: int
    healthy: int
    prune_candidates: int
    notes: list[str] = field(default_factory=list)


@dataclass
class SweepSummary:
    counts: dict[str, int]
    duration_s: float
    dry_run: bool
    plan: SweepPlan
    errors: list[str]

    def as_log_fields(self) -> dict:
        return {**self.counts, "duration_s": round(self.duration_s, 3), "dry_run": self.dry_run,
                "actions_planned": len(self.plan.actions)}


def entry_key(entry: dict, project: str) -> VmKey | None:
    """The VM a listed WorkloadEntry names, or None. Anyone who may create WorkloadEntries can label
    one as meshjoin's and annotate any VM: a key naming another project than the one meshjoin manages,
    or no valid GCE name, is dropped, never acted on."""
    annotations = (entry.get("metadata") or {}).get("annotations") or {}
    parts = [annotations.get(names.ANNOTATION_PREFIX + k) for k in ("project", "zone", "instance")]
    if not all(isinstance(p, str) for p in parts) or parts[0] != project:
        return None
    try:
        return validated_key(*parts)
    except BadMessage:
        return None


def planning_entry(entry: dict, shared: dict[str, str]) -> dict:
    """What the plan (and `meshjoin status`) read of a listed WorkloadEntry: its name and namespace, its
    `app` label, the annotations naming its VM, its address and ports. The rest (managedFields, the
    server's fields, other labels and annotations, the spec's other parts) is dropped as the listing is
    read: a 100,000-VM inventory holds one entry per VM. Strings a fleet repeats (namespaces, apps, the
    project and zone) are kept once in `shared`."""
    meta = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}
    intern = shared.setdefault

    def kept(mapping, keys, repeated=()) -> dict:
        if not isinstance(mapping, dict):
            return {}
        return {intern(k, k): intern(v, v) if k in repeated and isinstance(v, str) else v
                for k, v in mapping.items() if k in keys}

    namespace = meta.get("namespace")
    return {"metadata": {"name": meta.get("name"),
                         "namespace": intern(namespace, namespace) if isinstance(namespace, str) else namespace,
                         "labels": kept(meta.get("labels"), ("app",), ("app",)),
                         "annotations": kept(meta.get("annotations"), _VM_ANNOTATIONS, _REPEATED_ANNOTATIONS)},
            "spec": {k: spec[k] for k in ("address", "ports") if k in spec}}


_VM_ANNOTATIONS = frozenset(names.ANNOTATION_PREFIX + k for k in ("project", "zone", "instance"))
_REPEATED_ANNOTATIONS = frozenset(names.ANNOTATION_PREFIX + k for k in ("project", "zone"))


def _entry_ref(entry: dict) -> str:
    meta = entry.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def plan_sweep(inventory: Inventory, settings: Settings, ca_fingerprint: str, now: datetime) -> SweepPlan:
    """Decide, from listings alone, what each VM needs. Pure."""
    actions: list[Action] = []
    notes: list[str] = []
    denied = healthy = 0
    entries_by_ref = {_entry_ref(e): e for e in inventory.entries}
    entry_keys = {entry_key(e, settings.project) for e in inventory.entries}
    for key in sorted(inventory.vms):
        # One VM's data (labels, metadata, a forged status) can only ever affect that VM's plan.
        try:
            action = _plan_vm(key, inventory.vms[key], settings, ca_fingerprint, now, entries_by_ref,
                              key in entry_keys, key in inventory.secrets, inventory.complete, notes)
        except Exception as exc:  # noqa: BLE001 - a bug triggered by one VM's input must not stop the sweep
            notes.append(f"{key}: not planned ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        if action == "denied":
            denied += 1
        elif action is None:
            healthy += 1
        else:
            denied += action.reason.startswith(TO_BE_DENIED)
            actions.append(action)
    # Renewals due first are renewed first when the budget runs short.
    actions.sort(key=lambda a: ([JOIN, REISSUE, RENEW].index(a.kind), _renewal_order(inventory, a, settings)))

    prunes: list[Action] = []
    if inventory.unreachable_zones:
        notes.append("zones unreachable, their VMs neither pruned nor re-joined this sweep: "
                     + ", ".join(sorted(inventory.unreachable_zones)))
    if inventory.complete:
        orphans = entry_keys | {k for k in inventory.secrets if k.project == settings.project}
        for key in sorted(k for k in orphans if k is not None and k not in inventory.vms
                          and k.zone not in inventory.unreachable_zones):
            prunes.append(Action(PRUNE, key, "no labelled VM by that name (404 or label removed)"))
        # A denial planned above removes the VM's legacy secret itself.
        denying = {a.key for a in actions if a.reason.startswith(TO_BE_DENIED)}
        for key in sorted(k for k in inventory.secrets if k in inventory.vms and k not in denying
                          and not is_legacy(inventory.vms[k])):
            prunes.append(Action(PRUNE_SECRET, key, "legacy per-VM secret of a VM that no longer uses one "
                                                    "(migrated to agent 3, or never named it)"))
        selected = {((e.get("metadata") or {}).get("namespace"), ((e.get("metadata") or {}).get("labels") or {}).get("app"))
                    for e in inventory.entries}
        for svc in inventory.services:
            meta = svc["metadata"]
            if (meta["namespace"], meta["name"]) not in selected:
                prunes.append(Action(PRUNE_SERVICE, None, "no WorkloadEntry selects it",
                                     target=f"{meta['namespace']}/{meta['name']}"))
    else:
        notes.append("listing incomplete, nothing pruned: " + "; ".join(inventory.errors))
    if len(prunes) > settings.prune_cap:
        notes.append(f"{len(prunes)} objects to prune exceed MESHJOIN_PRUNE_CAP={settings.prune_cap}: "
                     f"pruning {settings.prune_cap} this sweep; check that VMs were really deleted")
    return SweepPlan(actions + prunes[:settings.prune_cap], denied, healthy, len(prunes), notes)


def _time_or_none(value: str | None) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def soonest_cert_expiry(inventory: Inventory, now: datetime) -> int | None:
    """Seconds left on the delivered certificate closest to expiry among joined VMs, as listed at the
    start of the sweep (negative if expired; None without any). An alert watches it (deploy/terraform/
    monitoring.tf): renewal is due at about half of a certificate's life, so a low value means
    renewals have been failing for hours. Pure."""
    left = []
    for vm in inventory.vms.values():
        status = bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY))
        delivered = Delivered.from_status(status) if status.get("state") == "joined" else None
        if delivered is not None:
            left.append(int((delivered.not_after - now).total_seconds()))
    return min(left) if left else None


def _plan_vm(key: VmKey, vm: Vm, settings: Settings, ca_fingerprint: str, now: datetime,
             entries_by_ref: dict[str, dict], has_entry: bool, has_secret: bool, complete: bool,
             notes: list[str]) -> Action | str | None:
    """One VM's action; "denied" (already recorded) or None (healthy) when there is nothing to do."""
    status = bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY))
    decision = decide_identity(vm, settings)
    if isinstance(decision, Denial):
        # An unbound account's VM gets no status (meshjoin may not write it): act only to remove traces,
        # as meshjoin's own listings show them (a VM still waiting for its agent has a key but no entry yet;
        # a status the owner forged to read "denied" must not keep them alive).
        recorded = decision.account_bound and status.get("state") == "denied" and \
            status.get("reason") == decision.reason
        if not has_entry and not has_secret and (recorded or not decision.account_bound):
            return "denied"
        return Action(JOIN, key, f"{TO_BE_DENIED}: {decision.reason}")
    if vm.status in STOPPED_STATES:
        if status.get("state") == "stopped" and not has_entry:
            return None
        return Action(JOIN, key, f"the VM is {vm.status}: to be taken out of routing")
    delivered = Delivered.from_status(status)
    if status.get("state") == "waiting":
        # meshjoin did its part; re-check whether the VM's agent has handed in its key or confirmed since.
        awaited = "confirm" if delivered is not None else "hand in its key (CSR)"
        since = _time_or_none(status.get("waitingSince"))
        if since is not None and now - since > settings.confirm_timeout:
            notes.append(f"{key} has waited {str(now - since).split('.')[0]} for its agent to {awaited} "
                         "(MESHJOIN_CONFIRM_TIMEOUT): reboot it, or run "
                         "`sudo google_metadata_script_runner startup` on it; `meshjoin explain` says more")
        return Action(JOIN, key, f"waiting for the VM to {awaited}")
    if is_legacy(vm):
        return Action(JOIN, key, "migrating from its per-VM secret: checking for agent 3's key")
    if status.get("state") != "joined" or delivered is None:
        return Action(JOIN, key, f"labelled but {str(status.get('state') or 'never handled')[:40]}")
    entry = entries_by_ref.get(status.get("workloadEntry")) if isinstance(status.get("workloadEntry"), str) else None
    if entry is None and complete:
        return Action(JOIN, key, f"its WorkloadEntry {str(status.get('workloadEntry'))[:120]} is missing")
    if entry is not None:
        spec = entry.get("spec") or {}
        if spec.get("address") != vm.network_ip or (spec.get("ports") or {}) != dict(decision.ports):
            return Action(JOIN, key, "its address or ports changed")
    why = needs_new_cert(delivered, vm=vm, spiffe=decision.spiffe(settings.trust_domain),
                         ca_fingerprint=ca_fingerprint, now=now, settings=settings)
    if why is None:
        if rekey_pending(status.get("rekey") if isinstance(status.get("rekey"), str) else None, delivered.key_id):
            return Action(JOIN, key, "a key rotation was requested: checking for the VM's new key")
        return None
    kind = REISSUE if delivered.ca_fingerprint != ca_fingerprint else RENEW if "renewal" in why else JOIN
    return Action(kind, key, why)


def _renewal_order(inventory: Inventory, action: Action, settings: Settings) -> float:
    vm = inventory.vms.get(action.key) if action.key else None
    delivered = Delivered.from_status(bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY))) if vm else None
    if delivered is None:
        return 0.0
    return pki.renewal_time(delivered.not_before, delivered.not_after, renew_fraction=settings.renew_fraction,
                            jitter_fraction=settings.renew_jitter_fraction, jitter_key=str(vm.key)).timestamp()


class Sweeper:
    def __init__(self, settings: Settings, reconciler: Reconciler, clock: Callable[[], datetime]):
        self.settings = settings
        self.reconciler = reconciler
        self.clock = clock

    def inventory(self) -> Inventory:
        """The three listings; a failed one is recorded, so the plan knows not to prune."""
        r = self.reconciler
        errors: list[str] = []

        def listing(what: str, produce):
            try:
                return produce()
            except MeshjoinError as exc:
                errors.append(f"{what}: {exc}")
                return None

        unreachable: set[str] = set()
        vms = listing("Compute instances", lambda: {vm.key: vm for vm in r.compute.list_vms(LABEL_FILTER,
                                                                                          unreachable=unreachable)})
        shared: dict[str, str] = {}
        entries = listing("WorkloadEntries", lambda: [planning_entry(e, shared) for e in r.kube.list(
            "WorkloadEntry", OWNED_SELECTOR, page_size=CLUSTER_PAGE)])
        services = listing("Services", lambda: list(r.kube.list("Service", OWNED_SELECTOR, page_size=CLUSTER_PAGE)))
        secrets = listing("legacy per-VM secrets", lambda: dict(r.secrets.list_vm_secrets()))
        return Inventory(vms or {}, entries or [], services or [], secrets or {}, errors, frozenset(unreachable))

    def sweep(self, *, dry_run: bool = False, progress: Callable[[int, int], None] | None = None) -> SweepSummary:
        started = time.monotonic()
        counts = dict.fromkeys(("joined", "waiting", "renewed", "reissued", "rotated", "migrated", "pruned",
                                "denied", "errors", "deferred"), 0)
        inventory = self.inventory()
        errors = list(inventory.errors)
        if "Compute instances" in " ".join(inventory.errors):
            plan = SweepPlan([], 0, 0, 0, ["no VM listing: nothing to do this sweep"])
        else:
            try:
                ca_fingerprint = self.reconciler.secrets.plugin_ca().fingerprint
            except MeshjoinError as exc:
                errors.append(f"plug-in CA: {exc}")
                ca_fingerprint = ""
            plan = plan_sweep(inventory, self.settings, ca_fingerprint, self.clock()) if ca_fingerprint else \
                SweepPlan([], 0, 0, 0, ["no CA: nothing to do this sweep"])
        counts["denied"] = plan.denied
        counts["errors"] = len(errors)
        for note in plan.notes:
            log("ERROR" if "exceed" in note or "incomplete" in note else "WARNING", note,
                outcome="overdue" if "to confirm" in note else "deferred")
        if not dry_run:
            self._execute(plan, inventory, counts, errors, started, progress)
        summary = SweepSummary(counts, time.monotonic() - started, dry_run, plan, errors)
        log("ERROR" if errors else "INFO", "sweep finished" + (" (dry run)" if dry_run else ""),
            outcome="swept", soonest_cert_expiry_s=soonest_cert_expiry(inventory, self.clock()),
            **summary.as_log_fields())
        return summary

    def _execute(self, plan: SweepPlan, inventory: Inventory, counts: dict, errors: list[str], started: float,
                 progress) -> None:
        # The configured cap, lowered to what this process's share of Compute's quotas allows.
        budget_renewals = sweep_renewal_budget(self.settings)
        deadline = started + self.settings.sweep_seconds.total_seconds()
        runnable: list[Action] = []
        for action in plan.actions:
            if action.kind in (RENEW, REISSUE):
                if budget_renewals <= 0:
                    counts["deferred"] += 1
                    continue
                budget_renewals -= 1
            runnable.append(action)
        if counts["deferred"]:
            log("WARNING", f"{counts['deferred']} renewals deferred to the next sweep "
                           f"(budget {sweep_renewal_budget(self.settings)}: MESHJOIN_SWEEP_RENEWALS="
                           f"{self.settings.sweep_renewals}, Compute quota share)", outcome="deferred")
        done = 0

        def run(action: Action) -> tuple[Action, str]:
            if time.monotonic() > deadline:
                return action, "deferred"
            try:
                if action.kind == PRUNE_SERVICE:
                    namespace, _, name = action.target.partition("/")
                    return action, "pruned" if self.reconciler.prune_service(namespace, name) else "unchanged"
                if action.kind == PRUNE_SECRET:
                    return action, "pruned" if self.reconciler.prune_legacy_secret(action.key) else "unchanged"
                # A denial the sweep planned removes what meshjoin's listings showed (a key, an entry).
                outcome = self.reconciler.reconcile(action.key, vm=inventory.vms.get(action.key),
                                                    cleanup=action.kind == PRUNE or
                                                    action.reason.startswith(TO_BE_DENIED),
                                                    legacy_secret=action.key in inventory.secrets, read_agent=False)
                return action, outcome.verb
            except MeshjoinError as exc:
                # One VM's failure, transient, permanent or a missing permission, is that VM's: logged for
                # it and counted; the sweep goes on with the others. Only a failed inventory stops a sweep.
                return action, f"error: {type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - one VM's failure (a bug its data triggers) is that VM's only
                log("ERROR", f"sweep action {action.describe()[:200]} failed: {type(exc).__name__}: {str(exc)[:300]}",
                    key=action.key, outcome="failed", error_kind=type(exc).__name__)
                return action, f"error: unexpected {type(exc).__name__}: {str(exc)[:200]}"

        with ThreadPoolExecutor(max_workers=self.settings.sweep_workers) as pool:
            for action, verb in pool.map(run, runnable):
                done += 1
                if progress:
                    progress(done, len(runnable))
                if verb.startswith("error"):
                    counts["errors"] += 1
                    errors.append(f"{action.describe()}: {verb}")
                    log("WARNING", f"sweep action failed: {verb}", key=action.key, outcome="failed")
                elif verb == "failed":
                    counts["errors"] += 1
                elif verb in SWEEP_COUNTER:
                    counts[SWEEP_COUNTER[verb]] += 1


# Reconcile verbs → summary counters (denials are counted from the plan, once per denied VM).
SWEEP_COUNTER = {"registered": "joined", "renewed": "renewed", "reissued": "reissued", "rotated": "rotated",
                 "migrated": "migrated", "left": "pruned", "pruned": "pruned", "deferred": "deferred",
                 "delivered": "waiting", "bootstrapped": "waiting", "rechecked": "waiting"}
