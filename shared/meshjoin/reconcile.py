"""Reconcile one VM: make the mesh match what Compute says about it now.

The same code serves the event function, the scheduled sweep and the CLI. It is level-triggered:
whatever event arrived, it reads the VM and decides join / refresh / leave / deny from the truth,
so duplicates and reordering converge to the same end state.

Keys stay on the VM (issue 14). A join goes:
1. meshjoin writes the bootstrap items without a certificate; the VM is `waiting` for its key.
2. The VM's agent makes its key on the VM and writes a CSR for it to guest attribute `meshjoin/csr`
   (only the VM itself can write its guest attributes), then nudges meshjoin through Pub/Sub.
3. meshjoin validates the CSR (proof of possession, key type), ignores every name in it, and signs
   its public key with the identity policy grants: `meshjoin-cert-chain`, public, in metadata.
4. The agent installs the chain beside its key and reports the certificate's serial and a running
   sidecar; only then is the VM `joined` and given its WorkloadEntry (what Services select).
Renewals and CA re-issues re-certify the VM's current key (its CSR stays in the guest attributes);
a CSR for another key (a rotation meshjoin asked for with `meshjoin-rekey`, or the agent's own) is
certified as soon as it arrives. No Secret Manager write, and no private key, anywhere.

Write order makes every prefix of a pass safe to repeat: cluster objects (only for a confirmed VM) →
instance metadata (bootstrap + certificate + `meshjoin-status`, one setMetadata). The status is
written last, so `joined` is only ever claimed once everything it names exists. Confirmation is kept
across renewals, re-issues and key rotations of the same VM incarnation and identity (the sidecar
already serves; the agent installs what meshjoin delivers by itself).

VMs joined by meshjoin 2 (a per-VM secret named by `meshjoin-secret`) migrate: they get the new agent
and keep their secret and entry until agent 3's certificate is confirmed; then the item goes and the
secret is deleted.

Every decision is plan.py's (pure, table-tested): `course` says leave / deny / stop / join, `plan_join`
turns a join's facts into steps. This module reads the facts and performs the steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable

from . import names, pki, registration
from .adapters.compute import Compute
from .adapters.kube import Kube
from .adapters.secrets import Secrets
from .errors import ConflictError, PermanentError, StaleFingerprint, TransientError
from .logs import log
from .model import Denial, Identity, Vm, VmKey
from .plan import (MAX_BACKDATE, AgentWords, Certify, CheckEntryName, DeleteLegacySecret, Deny, Join, JoinFacts,
                   Leave, LogWarning, Register, Step, Stop, Verb, Withdraw, WriteMetadata, course, has_traces,
                   is_legacy, needs_project_script, plan_join, project_startup_script, reads_agent, serial_hex)
from .settings import Settings
from .status import State, Status, wire_fields, written

MAX_METADATA_RACES = 5


@dataclass
class Outcome:
    """What one reconcile did: a past-tense verb plus facts for the log line and the CLI."""

    verb: Verb  # a str: `outcome.verb == "delivered"` holds
    reason: str = ""
    state: State | None = None
    details: dict = field(default_factory=dict)


class Reconciler:
    def __init__(self, settings: Settings, compute: Compute, secrets: Secrets, kube: Kube,
                 clock: Callable[[], datetime]):
        self.settings = settings
        self.compute = compute
        self.secrets = secrets
        self.kube = kube
        self.clock = clock

    def reconcile(self, key: VmKey, *, force_new_cert: bool = False, vm: Vm | None = None,
                  cleanup: bool = False, legacy_secret: bool = False, read_agent: bool = True) -> Outcome:
        """Converge one VM. A concurrent writer (412 on metadata) makes it re-read and decide again.

        `vm` (from a listing) saves the first read; `cleanup` (the sweep's prune, or a denial it planned
        from its listings) removes cluster objects of an unlabelled or denied VM even when its metadata
        shows no trace of a join, and `legacy_secret` (the sweep listed one) its meshjoin 2 per-VM secret
        (one the VM's own `meshjoin-secret` names goes too). `read_agent` False (the sweep): the VM's guest
        attributes are read only when needed (not yet confirmed, a certificate due, a rotation or a
        migration pending); an event (the agent's nudge) always reads them.
        """
        if key.project not in self.settings.vm_projects:
            # Never act for another project's VM, whatever named it (a forged entry, a message).
            return Outcome(Verb.IGNORED, f"project {key.project[:80]!r} is not among MESHJOIN_VM_PROJECTS")
        try:
            for _ in range(MAX_METADATA_RACES):
                # A listing's slim view (metadata_complete False) is read whole before any decision.
                current = vm if vm is not None and vm.metadata_complete else self.compute.get_vm(key)
                vm = None  # a given VM is only trusted for the first pass
                try:
                    return self._decide_and_act(key, current, force_new_cert, cleanup, legacy_secret, read_agent)
                except StaleFingerprint:
                    continue  # a certificate signed in the lost pass is public and undelivered: nothing to undo
            raise TransientError(f"{key}: metadata kept changing during reconcile")
        except PermanentError as exc:
            return self._fail(key, exc)

    def leave(self, key: VmKey) -> Outcome:
        """Take a VM out of the mesh now, whatever its labels say (the operator's `meshjoin leave`).

        The status says `left` before the entries go: a concurrent pass (the VM's agent nudged the events
        function) that read the VM before this write loses its own metadata write (412) and withdraws the
        entry it applied, so none is left behind whichever of the two writes the cluster last.
        """
        try:
            vm = self.compute.get_vm(key)
            legacy_secret = vm is not None and is_legacy(vm)
            for _ in range(MAX_METADATA_RACES):
                if vm is None:
                    break
                try:
                    self._write_status(vm, State.LEFT, "removed by an operator", remove_bootstrap=True)
                    break
                except StaleFingerprint:
                    vm = self.compute.get_vm(key)
            else:
                raise TransientError(f"{key}: metadata kept changing during leave")
            self._remove_registration(key, legacy_secret=legacy_secret)
            return Outcome(Verb.LEFT, "removed by an operator", state=State.LEFT)
        except PermanentError as exc:
            return self._fail(key, exc)

    def _decide_and_act(self, key: VmKey, vm: Vm | None, force: bool, cleanup: bool, legacy_secret: bool,
                        read_agent: bool) -> Outcome:
        if vm is None:
            # A secret is deleted only when one is known to exist (the sweep listed it): a delete is a write.
            self._remove_registration(key, legacy_secret=legacy_secret)
            return Outcome(Verb.LEFT, "the VM no longer exists")
        legacy_secret = legacy_secret or is_legacy(vm)
        match course(vm, self.settings):
            case Leave():
                return self._leave_unlabelled(vm, cleanup, legacy_secret)
            case Deny(denial):
                return self._deny(vm, denial, cleanup, legacy_secret)
            case Stop():
                return self._stopped(vm)
            case Join(identity):
                return self._join(vm, identity, force, read_agent)

    def _leave_unlabelled(self, vm: Vm, cleanup: bool, legacy_secret: bool) -> Outcome:
        if not has_traces(vm):
            if cleanup or legacy_secret:
                self._remove_registration(vm.key, legacy_secret=legacy_secret)
                return Outcome(Verb.LEFT, "the VM is not labelled mesh=join")
            return Outcome(Verb.IGNORED, "the VM is not labelled mesh=join")
        self._remove_registration(vm.key, legacy_secret=legacy_secret)
        self._write_status(vm, State.LEFT, "the label mesh=join was removed", remove_bootstrap=True)
        return Outcome(Verb.LEFT, "the label mesh=join was removed", state=State.LEFT)

    # --- join: read the facts, plan, perform the steps -------------------------------------------

    def _join(self, vm: Vm, identity: Identity, force: bool, read_agent: bool) -> Outcome:
        now = self.clock()
        ca = self.secrets.plugin_ca()
        project_script = needs_project_script(vm) and \
            project_startup_script(self.compute.project_metadata(vm.key.project))
        facts = JoinFacts(vm, identity, Status.of(vm), ca.fingerprint,
                          ca.bundle.root_certs_pem, now, self.settings, force, project_script)
        if reads_agent(facts, always=read_agent):
            attributes = self.compute.guest_attributes(vm.key)
            facts = replace(facts, agent=AgentWords.from_attributes(attributes, self.settings.key_algorithm))
        planned = plan_join(facts)
        if (certify := planned.certify) is not None:
            # The plan stops at Certify (its last step): sign, then plan the rest with the certificate as a fact.
            self._perform(vm, identity, planned.steps[:-1])
            planned = plan_join(replace(facts, issued=self._certify(vm, ca.bundle, certify, facts.now)))
        changed = self._perform(vm, identity, planned.steps)
        return Outcome(planned.verb_if_written if changed else planned.verb_if_not, planned.reason,
                       state=planned.state, details=wire_fields(planned.write.fields))

    def _certify(self, vm: Vm, ca: pki.CaBundle, step: Certify, now: datetime) -> pki.IssuedCert:
        issued = pki.certify(ca, step.csr.public_key, step.spiffe, now=now, ttl=self.settings.cert_ttl,
                             backdate=min(MAX_BACKDATE, self.settings.cert_ttl / 10))
        log("INFO", f"certified key {issued.key_id} as {step.spiffe} ({step.why})", key=vm.key, outcome="certified",
            keyId=issued.key_id, certSerial=serial_hex(issued.serial))
        return issued

    def _perform(self, vm: Vm, identity: Identity, steps: tuple[Step, ...]) -> bool:
        """The executor: each step's one effect, in order. Answers whether the metadata write was made.

        An entry this pass applied is fenced by the fingerprint read at its start: the metadata write is then
        made even when nothing else changed, so a pass that lost a race (a `leave`, a stop) learns it (412),
        and withdraws that entry; the next pass re-decides from what it reads. A certificate signed in a lost
        pass is public and undelivered: nothing to undo.
        """
        applied, entry, changed = False, None, False
        for step in steps:
            match step:
                case CheckEntryName():
                    self._refuse_a_foreign_entry(vm, identity)
                case Register(not_after, previous):
                    entry, applied = self._register(vm, identity, not_after, previous=previous)
                case Withdraw(previous):
                    self._withdraw_entry(vm.key, previous)
                case LogWarning(message):
                    log("WARNING", message, key=vm.key, outcome="waiting")
                case WriteMetadata(items, remove, state, reason, fields):
                    try:
                        changed = self._write_metadata(vm, dict(items), state, reason, dict(fields), remove=remove,
                                                       always=applied)
                    except StaleFingerprint:
                        if applied:
                            self._withdraw_entry(vm.key, entry)
                        raise
                case DeleteLegacySecret():
                    if self.secrets.delete_vm_secret(vm.key):
                        log("INFO", "migrated to agent 3: the legacy per-VM secret was deleted", key=vm.key,
                            outcome="pruned")
                case _:
                    raise TypeError(f"{type(step).__name__} is not a step this executor performs here")
        return changed

    def _withdraw_entry(self, key: VmKey, previous: str | None) -> None:
        """An unconfirmed VM must not be selected by any Service: remove an entry a status still names."""
        if not previous:
            return
        namespace, _, name = previous.partition("/")
        self._delete_entry(key, namespace, name)

    def _refuse_a_foreign_entry(self, vm: Vm, identity: Identity) -> None:
        """Before a first delivery: the entry name the VM will register under must be free or meshjoin's.

        The cluster is written only once the VM confirms; a key delivered to a VM whose entry can never
        be written would stay readable while the VM sits in `error`. One GET per first delivery.
        """
        meta = registration.workload_entry(vm, identity, self.settings.network, self.clock())["metadata"]
        existing = self.kube.get("WorkloadEntry", meta["namespace"], meta["name"])
        if existing is not None and not names.owned(existing.get("metadata")):
            raise ConflictError(f"WorkloadEntry {meta['namespace']}/{meta['name']} exists and is not managed by "
                                "meshjoin; remove it or rename the VM")

    def _register(self, vm: Vm, identity: Identity, cert_not_after: datetime,
                  previous: str | None) -> tuple[str, bool]:
        """Cluster side: ServiceAccount if missing, the VM's own WorkloadEntry, then its Service if missing.
        Answers the entry's `namespace/name` and whether this pass wrote the entry.

        The Service comes after the entry that selects it: a Service meshjoin made with no entry
        selecting it is what the sweep prunes, so one must never exist while a join is under way.
        """
        self.kube.create_if_missing(registration.service_account(identity))
        desired = registration.workload_entry(vm, identity, self.settings.network, cert_not_after)
        meta = desired["metadata"]
        ref = registration.entry_ref(vm.key, identity)
        # An entry the status does not name yet (a first join) is created without reading it first.
        existing = self.kube.get("WorkloadEntry", meta["namespace"], meta["name"]) if previous == ref else None
        applied = previous != ref or existing is None or not registration.entry_matches(existing, desired)
        if applied:
            self.kube.apply_owned(desired, existing)
            log("INFO", f"WorkloadEntry {meta['namespace']}/{meta['name']} applied", key=vm.key,
                outcome="registered", address=vm.network_ip)
        service = registration.service(identity)
        if service is not None:
            current = self.kube.create_if_missing(service)
            if names.owned(current.get("metadata")) and not registration.service_matches(current, service):
                # The VM's mesh-ports changed (or another VM of the app declared others): meshjoin's own
                # Service follows the latest join. A Service meshjoin did not create is never changed.
                self.kube.apply_owned(service, current)
                log("INFO", f"Service {identity.namespace}/{identity.app} ports updated", key=vm.key,
                    outcome="refreshed")
        if previous and previous != ref:  # the identity moved to another namespace
            old_namespace, _, old_name = previous.partition("/")
            self._delete_entry(vm.key, old_namespace, old_name)
        return ref, applied

    # --- deny / leave ---------------------------------------------------------------------------

    def _deny(self, vm: Vm, denial: Denial, cleanup: bool = False, legacy_secret: bool = False) -> Outcome:
        # `cleanup`: the sweep saw a legacy secret or an entry of this VM in meshjoin's own listings,
        # whatever the VM's metadata (which its owner controls) claims.
        if has_traces(vm) or cleanup or legacy_secret:
            self._remove_registration(vm.key, legacy_secret=legacy_secret)
        if not denial.account_bound:
            # meshjoin may act only as bound accounts, and Compute requires actAs on the VM's account to
            # change its metadata: nothing is written to the VM. Operators see the reason in this log
            # line and in `meshjoin explain`.
            log("WARNING", f"denied, nothing written to the VM: {denial.reason}", key=vm.key, outcome="denied")
            return Outcome(Verb.DENIED, denial.reason, state=State.DENIED)
        self._write_status(vm, State.DENIED, denial.reason, remove_bootstrap=True)
        return Outcome(Verb.DENIED, denial.reason, state=State.DENIED)

    def _stopped(self, vm: Vm) -> Outcome:
        """A stopped VM is taken out of routing (its entry goes); its bootstrap and key stay, so it
        rejoins with a fresh certificate for its key when it starts again (the start event, or the next
        sweep)."""
        self._remove_entries(vm.key)
        reason = f"the VM is {vm.status}: not routed and not renewed until it runs again"
        self._write_status(vm, State.STOPPED, reason)
        return Outcome(Verb.STOPPED, reason, state=State.STOPPED)

    def _remove_registration(self, key: VmKey, legacy_secret: bool = False) -> None:
        """Delete the VM's entries (any namespace), orphaned Services meshjoin made, and with
        `legacy_secret` its meshjoin 2 per-VM secret (only VMs that had one: a delete costs a write)."""
        self._remove_entries(key)
        if legacy_secret and self.secrets.delete_vm_secret(key):
            log("INFO", "legacy per-VM secret deleted", key=key, outcome="pruned")

    def _remove_entries(self, key: VmKey) -> None:
        selector = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY},{names.VM_LABEL}={key.instance}"
        for entry in list(self.kube.list("WorkloadEntry", selector)):
            meta = entry["metadata"]
            annotations = meta.get("annotations") or {}
            if annotations.get(names.ANNOTATION_PREFIX + "zone") != key.zone or \
                    annotations.get(names.ANNOTATION_PREFIX + "project") != key.project:
                continue  # same instance name in another zone or project
            self._delete_entry(key, meta["namespace"], meta["name"], entry)

    def _delete_entry(self, key: VmKey, namespace: str, name: str, entry: dict | None = None) -> None:
        """Delete the VM's entry: only one meshjoin made FOR THIS VM (a status the VM owner forged may
        name another VM's entry, or a path that is no Kubernetes name)."""
        if not (_K8S_NAME.fullmatch(namespace) and _K8S_NAME.fullmatch(name)):
            return
        entry = entry or self.kube.get("WorkloadEntry", namespace, name)
        if entry is None or _entry_vm(entry) != key or \
                not self.kube.delete_owned("WorkloadEntry", namespace, name, entry):
            return
        log("INFO", f"WorkloadEntry {namespace}/{name} deleted", key=key, outcome="unregistered")
        app = (entry["metadata"].get("labels") or {}).get("app")
        if app:
            self.prune_service(namespace, app)

    def prune_legacy_secret(self, key: VmKey) -> bool:
        """Delete a meshjoin 2 per-VM secret the sweep listed for a VM that no longer names it; re-read
        first (one GET): a VM that still names its secret is migrating and keeps it."""
        vm = self.compute.get_vm(key)
        if vm is not None and is_legacy(vm):
            return False
        if self.secrets.delete_vm_secret(key):
            log("INFO", "legacy per-VM secret deleted: its VM no longer uses it", key=key, outcome="pruned")
            return True
        return False

    def prune_service(self, namespace: str, app: str) -> bool:
        """Delete a Service meshjoin made once it selects nothing (checked live, not from a listing).

        Never one that selects anything meshjoin did not create: pods (someone deployed the app in the
        cluster, and relies on this Service) or any WorkloadEntry. Nor one whose selector someone
        changed from meshjoin's `app=NAME`: what it selects is then no longer meshjoin's to judge.
        """
        service = self.kube.get("Service", namespace, app)
        if service is None or not names.owned(service.get("metadata")):
            return False
        if (service.get("spec") or {}).get("selector") != {"app": app}:
            log("WARNING", f"Service {namespace}/{app} kept: its selector is no longer meshjoin's", outcome="kept")
            return False
        for kind in ("WorkloadEntry", "Pod"):
            remaining = self.kube.list(kind, f"app={app}", namespace=namespace, page_size=1)
            if next(iter(remaining), None) is not None:
                return False
        if self.kube.delete_owned("Service", namespace, app, service):
            log("INFO", f"Service {namespace}/{app} deleted: no entry selects it", outcome="pruned")
            return True
        return False

    # --- metadata -------------------------------------------------------------------------------

    def _write_metadata(self, vm: Vm, items: dict[str, str], state: State, reason: str, fields: dict,
                        remove: frozenset[str] = frozenset(), always: bool = False) -> bool:
        """Write bootstrap items + status unless nothing but the timestamp would change (`always`: write
        anyway, for the fingerprint check)."""
        new_status = written(state, reason, self.clock(), **fields)
        same_status = Status.of(vm).facts == new_status.facts
        present = [k for k in remove if k in vm.metadata]
        if not always and same_status and not present and all(vm.metadata.get(k) == v for k, v in items.items()):
            return False
        self.compute.set_metadata(vm, {**items, names.STATUS_KEY: new_status.encode()}, remove=remove)
        return True

    def _write_status(self, vm: Vm, state: State, reason: str, remove_bootstrap: bool = False, **fields) -> None:
        remove = set(names.MESHJOIN_KEYS) - {names.STATUS_KEY} if remove_bootstrap else set()
        script = vm.metadata.get(names.STARTUP_SCRIPT_KEY, "")
        if remove_bootstrap and names.STARTUP_SCRIPT_MARKER in script:
            remove.add(names.STARTUP_SCRIPT_KEY)
        self._write_metadata(vm, {}, state, reason, fields, remove=frozenset(remove))

    # --- failure --------------------------------------------------------------------------------

    def _fail(self, key: VmKey, exc: PermanentError) -> Outcome:
        """A permanent failure: tell the VM owner in its status (best effort) and give up."""
        reason = str(exc)
        try:
            vm = self.compute.get_vm(key)
            if vm is not None and vm.wants_mesh:
                self._write_status(vm, State.ERROR, reason)
        except (TransientError, PermanentError, StaleFingerprint) as status_exc:
            log("WARNING", f"could not record the error in meshjoin-status: {status_exc}", key=key)
        log("ERROR", f"reconcile failed: {reason}", key=key, outcome="failed", error_kind=type(exc).__name__)
        return Outcome(Verb.FAILED, reason, state=State.ERROR)


_K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")


def _entry_vm(entry: dict) -> VmKey | None:
    """The VM a WorkloadEntry was made for, from meshjoin's annotations."""
    annotations = entry.get("metadata", {}).get("annotations") or {}
    parts = [annotations.get(names.ANNOTATION_PREFIX + k) for k in ("project", "zone", "instance")]
    return VmKey(*parts) if all(isinstance(p, str) and p for p in parts) else None
