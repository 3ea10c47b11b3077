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

The sweep plans; the fleet works (issue 16): each per-VM action (join, renew, reissue, prune) is
published to the events topic as `{"project", "zone", "instance", "work", "sweep"}`, and the events
function's instances do it with the same reconcile as any event. Service and legacy-secret prunes (few,
host-project objects) stay here. How much one sweep publishes per VM project is
`capacity.sweep_work_budget` (most urgent first; the rest is deferred and counted); a message that
cannot be published is that VM's deferral. Without a publisher (no MESHJOIN_EVENTS_TOPIC) or with
`inline=True` (`meshjoin reconcile --inline`) this process does the work itself, as before.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from secrets import token_hex
from typing import Callable, Collection

from . import capacity, names, pki
from .adapters.pubsub import Publisher
from .errors import BadMessage, MeshjoinError
from .events import validated_key
from .logs import log
from .model import JOIN_LABEL, JOIN_VALUE, Vm, VmKey
from .plan import Cause, Deny, Join, JoinFacts, Stop, Verb, is_legacy, labelled_course, rekey_pending
from .reconcile import Reconciler
from .settings import Settings
from .status import Delivered, State, Status, time_or_none

LABEL_FILTER = f"labels.{JOIN_LABEL}={JOIN_VALUE}"
# Compute pages at most 500 VMs; the cluster's small objects come in larger pages (fewer list calls).
CLUSTER_PAGE = 5000
OWNED_SELECTOR = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"


class Work(StrEnum):
    """What a sweep action does; the per-VM ones are also the `work` hint of its message."""

    JOIN = "join"
    REISSUE = "reissue"
    RENEW = "renew"
    PRUNE = "prune"
    PRUNE_SERVICE = "prune-service"
    PRUNE_SECRET = "prune-secret"


# The per-VM kinds in the order a sweep spends its budget on them, then the prunes.
JOIN, REISSUE, RENEW, PRUNE, PRUNE_SERVICE, PRUNE_SECRET = Work
TO_BE_DENIED = "to be denied"


class Note(str):
    """A line of the plan for the operator (a str: it reads and compares as its text), with the severity
    and outcome its log line carries."""

    severity: str
    outcome: str

    def __new__(cls, text: str, severity: str = "WARNING", outcome: str = Verb.DEFERRED) -> "Note":
        note = super().__new__(cls, text)
        note.severity, note.outcome = severity, outcome
        return note


def incomplete(text: str) -> Note:
    """A note that something could not be done at all this sweep: an ERROR line."""
    return Note(text, "ERROR")


@dataclass(frozen=True)
class UnlistedProject:
    """A VM project whose Compute listing failed: its VMs are unseen this sweep."""

    project: str
    why: str

    def __str__(self) -> str:
        return f"Compute instances in {self.project}: {self.why}"


@dataclass(frozen=True)
class WorkFailed:
    """One sweep action that raised: that VM's failure, counted, the sweep goes on."""

    error: str

    def __str__(self) -> str:
        return f"error: {self.error}"


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
    # VM projects whose listing failed (project -> why). Their VMs are unseen, so nothing of theirs is
    # pruned or re-joined this sweep; the other projects' VMs are planned as usual.
    unlisted_projects: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """The cluster's and Secret Manager's listings all answered (VM listings are judged per
        project: `unlisted_projects`, `seen`)."""
        return not self.errors

    @property
    def failures(self) -> list[str]:
        """Every listing that failed, for the log and the summary."""
        return self.errors + [str(unlisted) for unlisted in self.unlisted]

    @property
    def unlisted(self) -> list[UnlistedProject]:
        return [UnlistedProject(project, why) for project, why in sorted(self.unlisted_projects.items())]

    def seen(self, key: VmKey) -> bool:
        """Whether this sweep's VM listing covered the VM's project and zone: only then may its absence
        from the listing mean "gone or unlabelled". A zone UNREACHABLE in one project's listing is
        treated as unreachable in every project (a zonal outage is not a per-project fact; at worst a
        prune waits one sweep)."""
        return key.project not in self.unlisted_projects and key.zone not in self.unreachable_zones


@dataclass(frozen=True)
class Action:
    kind: Work
    key: VmKey | None
    reason: str
    target: str = ""  # namespace/name for a Service prune
    denies: bool = False  # a JOIN whose reconcile denies the VM: it removes, it certifies nothing

    def describe(self) -> str:
        subject = str(self.key) if self.key else self.target
        return f"{self.kind} {subject}: {self.reason}"


@dataclass
class SweepPlan:
    actions: list[Action]
    denied: int
    healthy: int
    prune_candidates: int
    notes: list[Note] = field(default_factory=list)


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


def entry_key(entry: dict, projects: str | Collection[str]) -> VmKey | None:
    """The VM a listed WorkloadEntry names, or None. Anyone who may create WorkloadEntries can label
    one as meshjoin's and annotate any VM: a key naming a project outside the VM projects meshjoin
    manages (`projects`: settings.vm_projects, or one project id), or no valid GCE name, is dropped,
    never acted on."""
    projects = (projects,) if isinstance(projects, str) else projects
    annotations = (entry.get("metadata") or {}).get("annotations") or {}
    parts = [annotations.get(names.ANNOTATION_PREFIX + k) for k in ("project", "zone", "instance")]
    if not all(isinstance(p, str) for p in parts) or parts[0] not in projects:
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
    notes: list[Note] = []
    denied = healthy = 0
    entries_by_ref = {_entry_ref(e): e for e in inventory.entries}
    entry_keys = {entry_key(e, settings.vm_projects) for e in inventory.entries}
    for key in sorted(inventory.vms):
        # One VM's data (labels, metadata, a forged status) can only ever affect that VM's plan.
        try:
            action = _plan_vm(key, inventory.vms[key], settings, ca_fingerprint, now, entries_by_ref,
                              key in entry_keys, key in inventory.secrets, inventory.complete, notes)
        except Exception as exc:  # noqa: BLE001 - a bug triggered by one VM's input must not stop the sweep
            notes.append(Note(f"{key}: not planned ({type(exc).__name__}: {str(exc)[:200]})"))
            continue
        if action == "denied":
            denied += 1
        elif action is None:
            healthy += 1
        else:
            denied += action.denies
            actions.append(action)
    # Renewals due first are renewed first when the budget runs short.
    actions.sort(key=lambda a: ([JOIN, REISSUE, RENEW].index(a.kind), _renewal_order(inventory, a, settings)))

    prunes: list[Action] = []
    if inventory.unreachable_zones:
        notes.append(Note("zones unreachable, their VMs neither pruned nor re-joined this sweep: "
                          + ", ".join(sorted(inventory.unreachable_zones))))
    if inventory.unlisted_projects:
        notes.append(incomplete("VM listing incomplete, these projects' VMs neither pruned nor re-joined this "
                                "sweep: " + "; ".join(f"{u.project}: {u.why}" for u in inventory.unlisted)))
    if inventory.complete:
        # Legacy per-VM secrets live in the host project and were only ever made for its VMs.
        orphans = entry_keys | {k for k in inventory.secrets if k.project == settings.project}
        for key in sorted(k for k in orphans if k is not None and k not in inventory.vms and inventory.seen(k)):
            prunes.append(Action(PRUNE, key, "no labelled VM by that name (404 or label removed)"))
        # A denial planned above removes the VM's legacy secret itself.
        denying = {a.key for a in actions if a.denies}
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
        notes.append(incomplete("listing incomplete, nothing pruned: " + "; ".join(inventory.errors)))
    if len(prunes) > settings.prune_cap:
        notes.append(incomplete(f"{len(prunes)} objects to prune exceed MESHJOIN_PRUNE_CAP={settings.prune_cap}: "
                                f"pruning {settings.prune_cap} this sweep; check that VMs were really deleted"))
    return SweepPlan(actions + prunes[:settings.prune_cap], denied, healthy, len(prunes), notes)


def soonest_cert_expiry(inventory: Inventory, now: datetime) -> int | None:
    """Seconds left on the delivered certificate closest to expiry among joined VMs, as listed at the
    start of the sweep (negative if expired; None without any). An alert watches it (deploy/terraform/
    monitoring.tf): renewal is due at about half of a certificate's life, so a low value means
    renewals have been failing for hours. Pure."""
    left = []
    for vm in inventory.vms.values():
        status = Status.of(vm)
        delivered = Delivered.from_status(status) if status.state == State.JOINED else None
        if delivered is not None:
            left.append(int((delivered.not_after - now).total_seconds()))
    return min(left) if left else None


def _plan_vm(key: VmKey, vm: Vm, settings: Settings, ca_fingerprint: str, now: datetime,
             entries_by_ref: dict[str, dict], has_entry: bool, has_secret: bool, complete: bool,
             notes: list[Note]) -> Action | str | None:
    """One VM's action; "denied" (already recorded) or None (healthy) when there is nothing to do. The course
    and what is due are the reconcile's own rules (plan.py), applied to the listing's view of the VM."""
    status = Status.of(vm)
    match labelled_course(vm, settings):
        case Deny(denial):
            # An unbound account's VM gets no status (meshjoin may not write it): act only to remove traces,
            # as meshjoin's own listings show them (a VM still waiting for its agent has a key but no entry yet;
            # a status the owner forged to read "denied" must not keep them alive).
            recorded = denial.account_bound and status.state == State.DENIED and status.reason == denial.reason
            if not has_entry and not has_secret and (recorded or not denial.account_bound):
                return "denied"
            return Action(JOIN, key, f"{TO_BE_DENIED}: {denial.reason}", denies=True)
        case Stop():
            if status.state == State.STOPPED and not has_entry:
                return None
            return Action(JOIN, key, f"the VM is {vm.status}: to be taken out of routing")
        case Join(identity):
            facts = JoinFacts(vm, identity, status, ca_fingerprint, root_pem="", now=now, settings=settings)
    delivered = facts.recorded
    if status.state == State.WAITING:
        # meshjoin did its part; re-check whether the VM's agent has handed in its key or confirmed since.
        awaited = "confirm" if delivered is not None else "hand in its key (CSR)"
        since = time_or_none(status.waiting_since)
        if since is not None and now - since > settings.confirm_timeout:
            # Overdue when a delivered certificate waits for confirmation; a missing key is only deferred.
            notes.append(Note(f"{key} has waited {str(now - since).split('.')[0]} for its agent to {awaited} "
                              "(MESHJOIN_CONFIRM_TIMEOUT): reboot it, or run "
                              "`sudo google_metadata_script_runner startup` on it; `meshjoin explain` says more",
                              outcome="overdue" if delivered is not None else Verb.DEFERRED))
        return Action(JOIN, key, f"waiting for the VM to {awaited}")
    if is_legacy(vm):
        return Action(JOIN, key, "migrating from its per-VM secret: checking for agent 3's key")
    if status.state != State.JOINED or delivered is None:
        return Action(JOIN, key, f"labelled but {str(status.state or 'never handled')[:40]}")
    entry = entries_by_ref.get(status.workload_entry) if status.workload_entry is not None else None
    if entry is None and complete:
        return Action(JOIN, key, f"its WorkloadEntry {str(status.workload_entry)[:120]} is missing")
    if entry is not None:
        spec = entry.get("spec") or {}
        if spec.get("address") != vm.network_ip or (spec.get("ports") or {}) != dict(identity.ports):
            return Action(JOIN, key, "its address or ports changed")
    why = facts.due()  # no CSR in a listing: a new key is found by the pass a rotation request plans
    if why is None:
        if rekey_pending(facts.token, delivered.key_id):  # validated as the reconcile reads it
            return Action(JOIN, key, "a key rotation was requested: checking for the VM's new key")
        return None
    kind = REISSUE if delivered.ca_fingerprint != ca_fingerprint else RENEW if why is Cause.RENEWAL_DUE else JOIN
    return Action(kind, key, why)


def _renewal_order(inventory: Inventory, action: Action, settings: Settings) -> float:
    vm = inventory.vms.get(action.key) if action.key else None
    delivered = Delivered.from_status(Status.of(vm)) if vm else None
    if delivered is None:
        return 0.0
    return pki.renewal_time(delivered.not_before, delivered.not_after, renew_fraction=settings.renew_fraction,
                            jitter_fraction=settings.renew_jitter_fraction, jitter_key=str(vm.key)).timestamp()


class Sweeper:
    """Lists, plans, and has the plan done: by publishing each per-VM action to the events topic
    (`publisher`; the events function's instances do the work), or inline in this process (no
    publisher: no MESHJOIN_EVENTS_TOPIC; or `inline=True`: `meshjoin reconcile --inline`)."""

    def __init__(self, settings: Settings, reconciler: Reconciler, clock: Callable[[], datetime],
                 publisher: Publisher | None = None):
        self.settings = settings
        self.reconciler = reconciler
        self.clock = clock
        self.publisher = publisher

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
        vms, unlisted = self._list_vm_projects(unreachable)
        shared: dict[str, str] = {}
        entries = listing("WorkloadEntries", lambda: [planning_entry(e, shared) for e in r.kube.list(
            "WorkloadEntry", OWNED_SELECTOR, page_size=CLUSTER_PAGE)])
        services = listing("Services", lambda: list(r.kube.list("Service", OWNED_SELECTOR, page_size=CLUSTER_PAGE)))
        secrets = listing("legacy per-VM secrets", lambda: dict(r.secrets.list_vm_secrets()))
        return Inventory(vms, entries or [], services or [], secrets or {}, errors, frozenset(unreachable), unlisted)

    def _list_vm_projects(self, unreachable: set[str]) -> tuple[dict[VmKey, Vm], dict[str, str]]:
        """Labelled VMs of every VM project, one paged listing each. A project whose listing fails is
        recorded as unlisted (with why) and contributes no VM at all, not a partial page; the others
        are kept."""
        vms: dict[VmKey, Vm] = {}
        unlisted: dict[str, str] = {}
        for project in self.settings.vm_projects:
            try:
                listed = {vm.key: vm for vm in self.reconciler.compute.list_vms(LABEL_FILTER, project=project,
                                                                                unreachable=unreachable)}
            except MeshjoinError as exc:
                unlisted[project] = str(exc)
                continue
            vms.update(listed)
        return vms, unlisted

    def sweep(self, *, dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
              inline: bool | None = None) -> SweepSummary:
        """One sweep. `inline` None: publish when there is a publisher, else work inline."""
        started = time.monotonic()
        counts = dict.fromkeys(SUMMARY_COUNTERS, 0)
        inventory = self.inventory()
        errors = inventory.failures
        if set(inventory.unlisted_projects) >= set(self.settings.vm_projects):
            plan = SweepPlan([], 0, 0, 0, [Note("no VM listing: nothing to do this sweep")])
        else:
            try:
                ca_fingerprint = self.reconciler.secrets.plugin_ca().fingerprint
            except MeshjoinError as exc:
                errors.append(f"plug-in CA: {exc}")
                ca_fingerprint = ""
            plan = plan_sweep(inventory, self.settings, ca_fingerprint, self.clock()) if ca_fingerprint else \
                SweepPlan([], 0, 0, 0, [Note("no CA: nothing to do this sweep")])
        counts["denied"] = plan.denied
        counts["errors"] = len(errors)
        for note in plan.notes:
            log(note.severity, note, outcome=note.outcome)
        publishing = self.publisher is not None if inline is None else not inline
        if publishing and self.publisher is None:
            raise ValueError("no publisher: MESHJOIN_EVENTS_TOPIC is not set; sweep inline instead")
        sweep_id = new_sweep_id(self.clock())
        if not dry_run:
            if publishing:
                self._publish(plan, inventory, counts, errors, started, progress, sweep_id)
            else:
                self._execute(plan, inventory, counts, errors, started, progress)
        summary = SweepSummary(counts, time.monotonic() - started, dry_run, plan, errors)
        log("ERROR" if errors else "INFO", "sweep finished" + (" (dry run)" if dry_run else ""),
            outcome="swept", sweep=sweep_id, mode="published" if publishing else "inline",
            soonest_cert_expiry_s=soonest_cert_expiry(inventory, self.clock()), **summary.as_log_fields())
        return summary

    # --- pacing (both modes) ------------------------------------------------------------------------

    def _paced(self, plan: SweepPlan, counts: dict) -> tuple[list[Action], list[Action]]:
        """Split the plan into the per-VM actions this sweep may do within its work budget (most urgent
        first: the plan's order) and the deferred rest, counted. Prunes are bounded by MESHJOIN_PRUNE_CAP
        in the plan, not by the budget: they are few and each frees the cluster of a stale entry."""
        # Compute's quotas are per project: each VM project has a budget of its own.
        budgets: dict[str, float] = {}
        costs = {kind: capacity.work_cost(self.settings, kind) for kind in (JOIN, RENEW, REISSUE)}
        runnable: list[Action] = []
        deferred: list[Action] = []
        for action in plan.actions:
            cost = costs.get(action.kind, 0.0)
            if cost and action.denies:
                cost = 0.0  # a denial removes; it renews nothing
            if cost:
                project = action.key.project
                left = budgets.setdefault(project, float(capacity.sweep_work_budget(self.settings)))
                if cost > left:
                    deferred.append(action)
                    continue
                budgets[project] = left - cost
            runnable.append(action)
        counts["deferred"] += len(deferred)
        if deferred:
            log("WARNING", f"{len(deferred)} per-VM works deferred to the next sweep (work budget "
                           f"{capacity.sweep_work_budget(self.settings)} renewal-equivalents per VM project per "
                           f"{self.settings.sweep_interval}: capacity.sweep_work_budget)", outcome="deferred")
        return runnable, deferred

    # --- publishing: the events function's instances do the work ----------------------------------

    def _publish(self, plan: SweepPlan, inventory: Inventory, counts: dict, errors: list[str], started: float,
                 progress, sweep_id: str) -> None:
        runnable, _ = self._paced(plan, counts)
        messages: list[dict] = []
        published_actions: list[Action] = []
        inline: list[Action] = []
        for action in runnable:
            if action.kind in (PRUNE_SERVICE, PRUNE_SECRET):
                inline.append(action)  # host-project objects, few: done here
                continue
            messages.append(work_message(action, sweep_id))
            published_actions.append(action)
            # A legacy per-VM secret listed for a VM being pruned or denied: deleted here (Secret
            # Manager lives in the host project; the event's reconcile only knows the VM's own item).
            if work_of(action) == PRUNE and action.key in inventory.secrets:
                inline.append(Action(PRUNE_SECRET, action.key, f"legacy per-VM secret of a VM to prune: {action.reason}"))
        results = self.publisher.publish(messages) if messages else []
        for action, message, result in zip(published_actions, messages, results):
            if result.ok:
                counts["published"] += 1
                counts[f"published_{message['work']}"] += 1
            else:
                counts["publish_failed"] += 1
                counts["deferred"] += 1
                log("WARNING", f"publishing {message['work']} failed, deferred to the next sweep: {result.error}",
                    key=action.key, outcome="deferred", work=message["work"], sweep=sweep_id)
        if progress:
            progress(len(messages), len(messages) + len(inline))
        if counts["publish_failed"]:
            log("WARNING", f"{counts['publish_failed']} of {len(messages)} works could not be published "
                           f"to {self.settings.events_topic}; the next sweep plans them again", outcome="deferred",
                sweep=sweep_id)
        self._run_inline(inline, inventory, counts, errors, started, progress, offset=len(messages))

    # --- inline: this process does the work (the CLI's --inline, no events topic) ------------------

    def _execute(self, plan: SweepPlan, inventory: Inventory, counts: dict, errors: list[str], started: float,
                 progress) -> None:
        runnable, _ = self._paced(plan, counts)
        self._run_inline(runnable, inventory, counts, errors, started, progress)

    def _run_inline(self, runnable: list[Action], inventory: Inventory, counts: dict, errors: list[str],
                    started: float, progress, offset: int = 0) -> None:
        deadline = started + self.settings.sweep_seconds.total_seconds()
        done = offset
        total = offset + len(runnable)

        def run(action: Action) -> tuple[Action, Verb | WorkFailed]:
            if time.monotonic() > deadline:
                return action, Verb.DEFERRED
            try:
                if action.kind == PRUNE_SERVICE:
                    namespace, _, name = action.target.partition("/")
                    return action, Verb.PRUNED if self.reconciler.prune_service(namespace, name) else Verb.UNCHANGED
                if action.kind == PRUNE_SECRET:
                    return action, Verb.PRUNED if self.reconciler.prune_legacy_secret(action.key) else Verb.UNCHANGED
                # A denial the sweep planned removes what meshjoin's listings showed (a key, an entry).
                outcome = self.reconciler.reconcile(action.key, vm=inventory.vms.get(action.key),
                                                    cleanup=action.kind == PRUNE or action.denies,
                                                    legacy_secret=action.key in inventory.secrets, read_agent=False)
                return action, outcome.verb
            except MeshjoinError as exc:
                # One VM's failure, transient, permanent or a missing permission, is that VM's: logged for
                # it and counted; the sweep goes on with the others. Only a failed inventory stops a sweep.
                return action, WorkFailed(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - one VM's failure (a bug its data triggers) is that VM's only
                log("ERROR", f"sweep action {action.describe()[:200]} failed: {type(exc).__name__}: {str(exc)[:300]}",
                    key=action.key, outcome="failed", error_kind=type(exc).__name__)
                return action, WorkFailed(f"unexpected {type(exc).__name__}: {str(exc)[:200]}")

        with ThreadPoolExecutor(max_workers=self.settings.sweep_workers) as pool:
            for action, verb in pool.map(run, runnable):
                done += 1
                if progress:
                    progress(done, total)
                if isinstance(verb, WorkFailed):
                    counts["errors"] += 1
                    errors.append(f"{action.describe()}: {verb}")
                    log("WARNING", f"sweep action failed: {verb}", key=action.key, outcome="failed")
                elif verb == Verb.FAILED:
                    counts["errors"] += 1
                elif verb in SWEEP_COUNTER:
                    counts[SWEEP_COUNTER[verb]] += 1


SUMMARY_COUNTERS = ("joined", "waiting", "renewed", "reissued", "rotated", "migrated", "pruned", "denied", "errors",
                    "deferred", "published", "published_join", "published_renew", "published_reissue",
                    "published_prune", "publish_failed")


def work_of(action: Action) -> str:
    """The `work` hint of a per-VM action's message. A denial the sweep planned is a removal ("prune":
    the event's reconcile then removes the registration the sweep's listings showed)."""
    if action.kind == JOIN and action.denies:
        return PRUNE
    return action.kind


def work_message(action: Action, sweep_id: str) -> dict:
    """Decision 1's contract: the operator's {project, zone, instance} plus the hints."""
    key = action.key
    return {"project": key.project, "zone": key.zone, "instance": key.instance, "work": work_of(action),
            "sweep": sweep_id}


def new_sweep_id(now: datetime) -> str:
    """A short token naming one sweep in its messages and logs: its start time and 6 random hex."""
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + token_hex(3)


# Reconcile verbs → summary counters (denials are counted from the plan, once per denied VM).
SWEEP_COUNTER = {Verb.REGISTERED: "joined", Verb.RENEWED: "renewed", Verb.REISSUED: "reissued",
                 Verb.ROTATED: "rotated", Verb.MIGRATED: "migrated", Verb.LEFT: "pruned", Verb.PRUNED: "pruned",
                 Verb.DEFERRED: "deferred", Verb.DELIVERED: "waiting", Verb.BOOTSTRAPPED: "waiting",
                 Verb.RECHECKED: "waiting"}
