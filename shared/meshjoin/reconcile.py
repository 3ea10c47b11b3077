"""Reconcile one VM: make the mesh match what Compute says about it now.

The same code serves the event function, the scheduled sweep and the CLI. It is level-triggered:
whatever event arrived, it reads the VM and decides join / refresh / leave / deny from the truth,
so duplicates and reordering converge to the same end state.

Write order makes every prefix of a join safe to repeat: per-VM secret version → cluster
objects → instance metadata (bootstrap + `meshjoin-status`). The status is written last, so
`joined` is only ever claimed once everything it names exists.

The VM's own truth: meshjoin's part (secret, bootstrap) makes a VM `waiting`; only when the VM's
agent reports, through guest attributes, the certificate meshjoin delivered and a running sidecar
is it `joined` and given its WorkloadEntry (what Services select). A VM that never confirms holds
its bootstrap but receives no traffic. Confirmation is kept across renewals of the same VM
incarnation and identity (the sidecar already serves; the agent picks renewals up by itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from . import bootstrap, names, pki, registration
from .adapters.compute import ComputeAdapter, StaleFingerprint
from .adapters.kube import KubeAdapter
from .adapters.secrets import SecretsAdapter
from .errors import ConflictError, PermanentError, TransientError
from .logs import log
from .model import Denial, Identity, Vm, VmKey
from .policy import decide_identity, is_default_compute_account
from .settings import Settings

MAX_METADATA_RACES = 5
# Why a certificate is minted that starts a VM's confirmation anew (a new VM or a new identity);
# renewals, re-issues and forced mints keep an earlier confirmation.
FIRST_DELIVERY = frozenset({"no certificate delivered yet", "the VM was recreated", "the identity changed"})
SIDECAR_STATES = frozenset({"running", "stopped", "failed"})
RUN_AGENT_REMEDY = ("GCE runs startup-script only at boot: reboot the VM, or run "
                    "`sudo google_metadata_script_runner startup` on it")
# A VM in these states serves nothing: it is not routed (and not renewed) until it runs again.
STOPPED_STATES = frozenset({"STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"})
MAX_BACKDATE = timedelta(minutes=5)  # tolerate VM clock skew without eating short test TTLs
# Longer than any pass can live (the functions time out after 300 s / 540 s, deploy/terraform/main.tf).
ORPHAN_VERSION_AGE = timedelta(minutes=15)


@dataclass
class Outcome:
    """What one reconcile did: a past-tense verb plus facts for the log line and the CLI."""

    # registered | delivered | rechecked | renewed | reissued | refreshed | unchanged | stopped | left | denied |
    # ignored | failed
    verb: str
    reason: str = ""
    state: str | None = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Delivered:
    """What the VM currently has, as recorded in its `meshjoin-status` by the last successful join."""

    spiffe: str
    instance_id: str
    ca_fingerprint: str
    secret_version: str
    not_before: datetime
    not_after: datetime
    serial: str = ""  # hex, lowercase, no leading zeros (what the agent reports as cert-serial)

    @classmethod
    def from_status(cls, status: dict) -> "Delivered | None":
        """None unless every piece is there and well-formed: the VM owner can write this item too."""
        try:
            fields = [status[k] for k in ("identity", "instanceId", "caFingerprint", "secret")]
            if not all(isinstance(value, str) for value in fields):
                return None
            return cls(*fields, not_before=_parse_time(status["certNotBefore"]),
                       not_after=_parse_time(status["certNotAfter"]), serial=str(status.get("certSerial", "")))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"{value[:40]!r} has no time zone")
    return parsed


def _rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def normalize_serial(value: str) -> str | None:
    """A reported serial as `serial_hex` writes it (openssl prints upper case, maybe with colons)."""
    text = value.strip().lower().replace(":", "")
    if text.startswith("serial="):
        text = text[len("serial="):]
    if not text or len(text) > 64 or any(c not in "0123456789abcdef" for c in text):
        return None
    return text.lstrip("0") or "0"


@dataclass(frozen=True)
class AgentReport:
    """What the VM's agent said about itself (guest attributes `meshjoin/*`), validated: the VM owner
    controls every byte of it, so it only ever confirms their own VM."""

    agent_version: str = ""
    cert_serial: str = ""
    sidecar: str = ""
    updated: str = ""

    @classmethod
    def from_attributes(cls, attributes: dict[str, str]) -> "AgentReport | None":
        if not attributes:
            return None

        def printable(key: str, limit: int = 64) -> str:
            value = attributes.get(key, "")
            return value[:limit] if isinstance(value, str) and value[:limit].isprintable() else ""

        sidecar = attributes.get("sidecar", "")
        return cls(agent_version=printable("agent-version"),
                   cert_serial=normalize_serial(attributes.get("cert-serial", "")) or "",
                   sidecar=sidecar if sidecar in SIDECAR_STATES else "",
                   updated=printable("updated", 40))

    def describe(self) -> str:
        # No timestamp: the status (which holds this) is rewritten only when the report's facts change.
        return (f"agent {self.agent_version or '?'} reports certificate {self.cert_serial or 'none'}, "
                f"sidecar {self.sidecar or 'unknown'}")


def confirmed(report: AgentReport | None, delivered_serial: str) -> bool:
    """Whether the agent confirmed holding the certificate meshjoin delivered, with its sidecar running. Pure."""
    return report is not None and bool(delivered_serial) and report.cert_serial == delivered_serial \
        and report.sidecar == "running"


def waiting_reason(spiffe: str, serial: str, report: AgentReport | None) -> str:
    said = report.describe() if report else "the VM's agent has not reported yet"
    return (f"waiting for the VM to confirm {spiffe}: meshjoin delivered certificate {serial}; {said}. "
            f"Until it confirms it receives no mesh traffic. If the VM was running when it was labelled: "
            f"{RUN_AGENT_REMEDY}; the agent's log is `journalctl -t meshjoin`")


RENEWAL_DUE = "the certificate reached its renewal point"
CA_CHANGED = "the CA changed"
VERB_BY_CAUSE = {RENEWAL_DUE: "renewed", CA_CHANGED: "reissued"}


def needs_new_cert(delivered: Delivered | None, *, vm: Vm, spiffe: str, ca_fingerprint: str, now: datetime,
                   settings: Settings, force: bool = False) -> str | None:
    """Why the VM needs a freshly minted certificate, or None. Pure."""
    if force:
        return "forced"
    if delivered is None:
        return "no certificate delivered yet"
    if delivered.instance_id != vm.instance_id:
        return "the VM was recreated"
    if delivered.spiffe != spiffe:
        return "the identity changed"
    if delivered.ca_fingerprint != ca_fingerprint:
        return CA_CHANGED
    if pki.needs_renewal(delivered.not_before, delivered.not_after, now,
                         renew_fraction=settings.renew_fraction,
                         jitter_fraction=settings.renew_jitter_fraction, jitter_key=str(vm.key)):
        return RENEWAL_DUE
    return None


def has_traces(vm: Vm) -> bool:
    """Whether meshjoin left anything on this VM that a leave must clean up."""
    if any(k in vm.metadata for k in names.MESHJOIN_KEYS if k != names.STATUS_KEY):
        return True
    state = bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY)).get("state")
    return state in ("joined", "waiting", "error")


class Reconciler:
    def __init__(self, settings: Settings, compute: ComputeAdapter, secrets: SecretsAdapter, kube: KubeAdapter,
                 clock: Callable[[], datetime]):
        self.settings = settings
        self.compute = compute
        self.secrets = secrets
        self.kube = kube
        self.clock = clock

    def reconcile(self, key: VmKey, *, force_new_cert: bool = False, vm: Vm | None = None,
                  cleanup: bool = False) -> Outcome:
        """Converge one VM. A concurrent writer (412 on metadata) makes it re-read and decide again.

        `vm` (from a listing) saves the first read; `cleanup` (the sweep's prune, or a denial it planned
        from its listings) removes cluster objects and secrets of an unlabelled or denied VM even when its
        metadata shows no trace of a join.
        """
        if key.project != self.settings.project:
            # Never act for another project's VM, whatever named it (a forged entry, a message).
            return Outcome("ignored", f"project {key.project[:80]!r} is not MESHJOIN_PROJECT")
        minted: list[str] = []
        try:
            for _ in range(MAX_METADATA_RACES):
                current = vm if vm is not None else self.compute.get_vm(key)
                vm = None  # a given VM is only trusted for the first pass
                try:
                    outcome = self._decide_and_act(key, current, force_new_cert, minted, cleanup)
                except StaleFingerprint:
                    continue
                self._discard_unused(minted, keep=outcome.details.get("secret"))
                return outcome
            raise TransientError(f"{key}: metadata kept changing during reconcile")
        except PermanentError as exc:
            return self._fail(key, exc, minted)
        except TransientError:
            self._discard_undelivered(key, minted)
            raise

    def leave(self, key: VmKey) -> Outcome:
        """Take a VM out of the mesh now, whatever its labels say (the operator's `meshjoin leave`)."""
        try:
            self._remove_registration(key)
            vm = self.compute.get_vm(key)
            if vm is not None:
                for _ in range(MAX_METADATA_RACES):
                    try:
                        self._write_status(vm, "left", "removed by an operator", remove_bootstrap=True)
                        break
                    except StaleFingerprint:
                        vm = self.compute.get_vm(key)
                        if vm is None:
                            break
            return Outcome("left", "removed by an operator", state="left")
        except PermanentError as exc:
            return self._fail(key, exc)

    def _decide_and_act(self, key: VmKey, vm: Vm | None, force: bool, minted: list[str], cleanup: bool) -> Outcome:
        if vm is None:
            self._remove_registration(key)
            return Outcome("left", "the VM no longer exists")
        if not vm.wants_mesh:
            if not has_traces(vm):
                if cleanup:
                    self._remove_registration(key)
                    return Outcome("left", "the VM is not labelled mesh=join")
                return Outcome("ignored", "the VM is not labelled mesh=join")
            self._remove_registration(key)
            self._write_status(vm, "left", "the label mesh=join was removed", remove_bootstrap=True)
            return Outcome("left", "the label mesh=join was removed", state="left")
        decision = decide_identity(vm, self.settings)
        if isinstance(decision, Denial):
            return self._deny(vm, decision, cleanup)
        if vm.status in STOPPED_STATES:
            return self._stopped(vm)
        return self._join(vm, decision, force, minted)

    # --- join -----------------------------------------------------------------------------------

    def _join(self, vm: Vm, identity: Identity, force: bool, minted: list[str]) -> Outcome:
        now = self.clock()
        ca = self.secrets.plugin_ca()
        spiffe = identity.spiffe(self.settings.trust_domain)
        status = bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY))
        delivered = Delivered.from_status(status)
        if delivered is not None and not self._own_version(vm.key, delivered.secret_version):
            delivered = None  # the status names a secret that is not this VM's: never point the VM at it
        why_new = needs_new_cert(delivered, vm=vm, spiffe=spiffe, ca_fingerprint=ca.fingerprint, now=now,
                                 settings=self.settings, force=force and not minted)
        was_confirmed = status.get("state") == "joined" and bool(status.get("confirmedSerial"))
        if why_new in FIRST_DELIVERY:
            self._refuse_a_foreign_entry(vm, identity)
        if why_new:
            cert = pki.issue_workload_cert(ca.bundle, spiffe, now=now, ttl=self.settings.cert_ttl,
                                           key_algorithm=self.settings.key_algorithm,
                                           backdate=min(MAX_BACKDATE, self.settings.cert_ttl / 10))
            version = self.secrets.store_vm_material(vm.key, cert, vm.service_account,
                                                     exists=delivered is not None)
            minted.append(version)
            superseded = delivered.secret_version if delivered else None
            delivered = Delivered(spiffe, vm.instance_id, ca.fingerprint, version, cert.not_before, cert.not_after,
                                  serial_hex(cert.serial))
            if why_new in FIRST_DELIVERY:
                was_confirmed = False  # a new VM or identity confirms afresh
        else:
            superseded = status.get("previousSecret")

        # The VM's own truth: until its agent confirms, meshjoin has done its part but the VM serves nothing.
        report = None
        confirmed_serial = status.get("confirmedSerial") if was_confirmed else None
        if not was_confirmed and why_new not in FIRST_DELIVERY:  # a serial minted just now cannot be reported yet
            report = AgentReport.from_attributes(self.compute.guest_attributes(vm.key))
            if confirmed(report, delivered.serial):
                confirmed_serial = delivered.serial
        is_joined = confirmed_serial is not None

        warnings = []
        if is_default_compute_account(vm.service_account):  # bound on purpose by an operator, still risky
            warnings.append("the VM runs as the project's default compute service account, which other VMs "
                            "share: they could read this VM's key; give it a dedicated service account")
        items = bootstrap.bootstrap_items(vm.key, identity, self.settings, root_pem=ca.bundle.root_certs_pem,
                                          secret_version=delivered.secret_version)
        remove: set[str] = set()
        own_script = vm.metadata.get(names.STARTUP_SCRIPT_KEY)
        if own_script is not None and names.STARTUP_SCRIPT_MARKER not in own_script:
            items.pop(names.STARTUP_SCRIPT_KEY)  # the owner's own script: never overwritten
            warnings.append("startup-script belongs to the VM owner and was kept; run the meshjoin agent "
                            f"({AGENT_PATH}) from it")
        elif project_startup_script(self.compute.project_metadata()):
            # An instance-level item would silently replace the project's script on this VM.
            items.pop(names.STARTUP_SCRIPT_KEY)
            if own_script is not None:
                remove.add(names.STARTUP_SCRIPT_KEY)  # ours from before the project had one
            warnings.append("the project's common metadata has its own startup-script, which meshjoin does not "
                            f"override; run the meshjoin agent ({AGENT_PATH}) from it")
        guest = vm.metadata.get(names.GUEST_ATTRIBUTES_KEY)
        if guest is not None:
            items.pop(names.GUEST_ATTRIBUTES_KEY, None)  # the owner's setting stays
            if guest.strip().lower() not in ("true", "1", "yes"):
                warnings.append(f"metadata {names.GUEST_ATTRIBUTES_KEY}={guest[:20]!r} disables guest attributes: "
                                "the VM's agent cannot confirm, so the VM receives no mesh traffic")

        if is_joined:
            entry = self._register(vm, identity, delivered.not_after, previous=status.get("workloadEntry"))
            state = "joined"
            reason = f"joined as {spiffe}" + (f" ({why_new})" if why_new else "") + \
                ("; the VM confirmed it" if not was_confirmed else "")
        else:
            self._withdraw_entry(vm.key, status.get("workloadEntry"))
            entry = None
            state = "waiting"
            reason = waiting_reason(spiffe, delivered.serial, report)
        waiting_since = None
        if state == "waiting":
            waiting_since = status.get("waitingSince") if status.get("state") == "waiting" and not why_new \
                else _rfc3339(now)
        status_fields = dict(
            identity=spiffe, workloadEntry=entry, secret=delivered.secret_version,
            certNotBefore=_rfc3339(delivered.not_before), certNotAfter=_rfc3339(delivered.not_after),
            certSerial=delivered.serial or None, confirmedSerial=confirmed_serial, waitingSince=waiting_since,
            agent=report.describe() if report else None,
            caFingerprint=delivered.ca_fingerprint, instanceId=vm.instance_id, address=vm.network_ip,
            previousSecret=superseded if _same_secret(superseded, delivered.secret_version) else None,
            warnings=warnings or None)
        changed = self._write_metadata(vm, items, state, reason, status_fields, remove=frozenset(remove))
        retired = status.get("previousSecret")
        if why_new and retired and retired != status_fields["previousSecret"] and \
                _same_secret(retired, delivered.secret_version):
            # Grace period: the version before this one stays readable for one renewal cycle,
            # the one before that is destroyed now.
            self.secrets.destroy_version(retired)
        # Versions an interrupted earlier pass minted but never delivered (the function died, or an
        # API failed after a write) are garbage: every join pass that wrote something looks (one list
        # call), since the pass that should have cleaned up may have died. Older than the delivered
        # one: at once; newer (a concurrent pass that lost the race and died before discarding): once
        # no pass can still be running, i.e. older than the functions' longest timeout.
        # Except after a first mint: version 1, made by this pass, has nothing older, and anything newer
        # is younger than ORPHAN_VERSION_AGE, so the list could find nothing (a first join saves the call);
        # and a pass that only re-checked a waiting VM's confirmation (the sweep's most frequent work)
        # spends no Secret Manager read on it.
        first_mint = why_new and delivered.secret_version.endswith("/versions/1")
        if not first_mint and (why_new or changed or is_joined):
            self.secrets.destroy_undelivered_versions(vm.key, delivered.secret_version,
                                                      keep=(status_fields["previousSecret"],),
                                                      minted_before=now - ORPHAN_VERSION_AGE)
        if why_new:
            verb = VERB_BY_CAUSE.get(why_new, "registered") if is_joined else "delivered"
        elif is_joined and not was_confirmed:
            verb = "registered"
        elif not is_joined:
            verb = "rechecked"  # still unconfirmed
        else:
            verb = "refreshed" if changed else "unchanged"
        return Outcome(verb, reason, state=state, details={**status_fields, "secret": delivered.secret_version})

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

    def _register(self, vm: Vm, identity: Identity, cert_not_after: datetime, previous: str | None) -> str:
        """Cluster side: ServiceAccount if missing, the VM's own WorkloadEntry, then its Service if missing.

        The Service comes after the entry that selects it: a Service meshjoin made with no entry
        selecting it is what the sweep prunes, so one must never exist while a join is under way.
        """
        self.kube.create_if_missing(registration.service_account(identity))
        desired = registration.workload_entry(vm, identity, self.settings.network, cert_not_after)
        meta = desired["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        # An entry the status does not name yet (a first join) is created without reading it first.
        existing = self.kube.get("WorkloadEntry", meta["namespace"], meta["name"]) if previous == ref else None
        if previous != ref or existing is None or not registration.entry_matches(existing, desired):
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
        return ref

    # --- deny / leave ---------------------------------------------------------------------------

    def _deny(self, vm: Vm, denial: Denial, cleanup: bool = False) -> Outcome:
        # `cleanup`: the sweep saw a key or entry of this VM in meshjoin's own listings, whatever the
        # VM's metadata (which its owner controls) claims.
        if has_traces(vm) or cleanup:
            self._remove_registration(vm.key)
        if not denial.account_bound:
            # meshjoin may act only as bound accounts, and Compute requires actAs on the VM's account to
            # change its metadata: nothing is written to the VM. Operators see the reason in this log
            # line and in `meshjoin explain`.
            log("WARNING", f"denied, nothing written to the VM: {denial.reason}", key=vm.key, outcome="denied")
            return Outcome("denied", denial.reason, state="denied")
        self._write_status(vm, "denied", denial.reason, remove_bootstrap=True)
        return Outcome("denied", denial.reason, state="denied")

    def _stopped(self, vm: Vm) -> Outcome:
        """A stopped VM is taken out of routing (its entry goes); its secret and bootstrap stay, so it
        rejoins with a fresh certificate when it starts again (the start event, or the next sweep)."""
        self._remove_entries(vm.key)
        reason = f"the VM is {vm.status}: not routed and not renewed until it runs again"
        self._write_status(vm, "stopped", reason)
        return Outcome("stopped", reason, state="stopped")

    def _remove_registration(self, key: VmKey) -> None:
        """Delete the VM's entries (any namespace), orphaned Services meshjoin made, and its secret."""
        self._remove_entries(key)
        if self.secrets.delete_vm_secret(key):
            log("INFO", "per-VM secret deleted", key=key, outcome="pruned")

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

    def _write_metadata(self, vm: Vm, items: dict[str, str], state: str, reason: str, fields: dict,
                        remove: frozenset[str] = frozenset()) -> bool:
        """Write bootstrap items + status unless nothing but the timestamp would change."""
        old_status = bootstrap.parse_status(vm.metadata.get(names.STATUS_KEY))
        new_status = bootstrap.status_value(state, reason, self.clock(), **fields)
        same_status = {k: v for k, v in old_status.items() if k not in ("updated", "reason")} == \
            {k: v for k, v in bootstrap.parse_status(new_status).items() if k not in ("updated", "reason")}
        present = [k for k in remove if k in vm.metadata]
        if same_status and not present and all(vm.metadata.get(k) == v for k, v in items.items()):
            return False
        self.compute.set_metadata(vm, {**items, names.STATUS_KEY: new_status}, remove=remove)
        return True

    def _write_status(self, vm: Vm, state: str, reason: str, remove_bootstrap: bool = False, **fields) -> None:
        remove = set(names.MESHJOIN_KEYS) - {names.STATUS_KEY} if remove_bootstrap else set()
        script = vm.metadata.get(names.STARTUP_SCRIPT_KEY, "")
        if remove_bootstrap and names.STARTUP_SCRIPT_MARKER in script:
            remove.add(names.STARTUP_SCRIPT_KEY)
        self._write_metadata(vm, {}, state, reason, fields, remove=frozenset(remove))

    # --- failure --------------------------------------------------------------------------------

    def _fail(self, key: VmKey, exc: PermanentError, minted: list[str] = ()) -> Outcome:
        """A permanent failure: tell the VM owner in its status (best effort) and give up.

        Versions this pass minted and the VM's metadata does not name are destroyed: a VM that keeps
        failing (e.g. a foreign object in the way) must not pile up enabled keys sweep after sweep.
        """
        reason = str(exc)
        try:
            vm = self.compute.get_vm(key)
            if vm is not None and vm.wants_mesh:
                self._write_status(vm, "error", reason)
            referenced = vm.metadata.get(names.SECRET_KEY) if vm is not None else None
            self._discard_unused([v for v in minted if v != referenced], keep=None)
        except (TransientError, PermanentError, StaleFingerprint) as status_exc:
            log("WARNING", f"could not record the error in meshjoin-status: {status_exc}", key=key)
        log("ERROR", f"reconcile failed: {reason}", key=key, outcome="failed", error_kind=type(exc).__name__)
        return Outcome("failed", reason, state="error")

    def _discard_undelivered(self, key: VmKey, minted: list[str]) -> None:
        """A pass that minted and then failed: destroy what it minted unless the VM's metadata names it
        (the write may have happened although its answer was lost). Best effort: what stays behind is
        found by the VM's next join pass."""
        if not minted:
            return
        try:
            vm = self.compute.get_vm(key)
            referenced = vm.metadata.get(names.SECRET_KEY) if vm is not None else None
            self._discard_unused(minted, keep=referenced)
        except (TransientError, PermanentError) as exc:
            log("WARNING", f"could not destroy undelivered secret versions {', '.join(minted)}: {exc}", key=key)

    def _own_version(self, key: VmKey, version: str) -> bool:
        secret, _, number = version.rpartition("/versions/")
        return number.isdigit() and secret.rsplit("/", 1)[-1] == self.secrets.vm_secret_id(key)

    def _discard_unused(self, minted: list[str], keep: str | None) -> None:
        """Versions minted by a pass that lost a race are destroyed: one current version per VM."""
        for version in minted:
            if version != keep:
                self.secrets.destroy_version(version)


AGENT_PATH = "/usr/local/sbin/meshjoin-agent"


def project_startup_script(project_metadata: dict[str, str]) -> bool:
    """Whether the project runs a startup-script of its own on every VM (not one meshjoin rendered)."""
    script = project_metadata.get(names.STARTUP_SCRIPT_KEY)
    return script is not None and names.STARTUP_SCRIPT_MARKER not in script


_K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")


def _entry_vm(entry: dict) -> VmKey | None:
    """The VM a WorkloadEntry was made for, from meshjoin's annotations."""
    annotations = entry.get("metadata", {}).get("annotations") or {}
    parts = [annotations.get(names.ANNOTATION_PREFIX + k) for k in ("project", "zone", "instance")]
    return VmKey(*parts) if all(isinstance(p, str) and p for p in parts) else None


def _same_secret(version: str | None, other: str) -> bool:
    """Whether two version names belong to the same secret (a recreated VM's old one may not)."""
    return bool(version) and version.rsplit("/versions/", 1)[0] == other.rsplit("/versions/", 1)[0]


