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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from . import bootstrap, names, pki, registration
from .adapters.compute import ComputeAdapter
from .adapters.kube import KubeAdapter
from .adapters.secrets import SecretsAdapter
from .errors import ConflictError, PermanentError, StaleFingerprint, TransientError
from .logs import log
from .model import Denial, Identity, Vm, VmKey
from .plan import Cause, Verb
from .policy import decide_identity, is_default_compute_account
from .settings import Settings
from .status import Delivered, State, Status, normalize_serial, rfc3339, time_or_none, wire_fields, written

MAX_METADATA_RACES = 5
SIDECAR_STATES = frozenset({"running", "stopped", "failed"})
RUN_AGENT_REMEDY = ("GCE runs startup-script only at boot: reboot the VM, or run "
                    "`sudo google_metadata_script_runner startup` on it")
CSR_WHERE = f"guest attribute {names.GUEST_NAMESPACE}/{names.CSR_ATTRIBUTE}"
# A VM in these states serves nothing: it is not routed (and not renewed) until it runs again.
STOPPED_STATES = frozenset({"STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"})
MAX_BACKDATE = timedelta(minutes=5)  # tolerate VM clock skew without eating short test TTLs
# `meshjoin-rekey` tokens: opaque to the agent, which only compares them with the last one it acted on.
REKEY_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")

@dataclass
class Outcome:
    """What one reconcile did: a past-tense verb plus facts for the log line and the CLI."""

    verb: Verb  # a str: `outcome.verb == "delivered"` holds
    reason: str = ""
    state: State | None = None
    details: dict = field(default_factory=dict)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


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


def read_csr(attributes: dict[str, str], allowed_algorithm: str) -> pki.VerifiedCsr | pki.CsrError | None:
    """The agent's CSR from its guest attributes: verified, refused (why), or None when there is none. Pure."""
    raw = attributes.get(names.CSR_ATTRIBUTE)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        return pki.CsrError("the CSR is not text")
    try:
        return pki.parse_csr(raw, allowed_algorithm)
    except pki.CsrError as exc:
        return exc


def confirmed(report: AgentReport | None, delivered_serial: str) -> bool:
    """Whether the agent confirmed holding the certificate meshjoin delivered, with its sidecar running. Pure."""
    return report is not None and bool(delivered_serial) and report.cert_serial == delivered_serial \
        and report.sidecar == "running"


def waiting_reason(spiffe: str, serial: str, report: AgentReport | None) -> str:
    said = report.describe() if report else "the VM's agent has not reported yet"
    return (f"waiting for the VM to confirm {spiffe}: meshjoin certified the VM's key (certificate {serial}, "
            f"metadata {names.CERT_CHAIN_KEY}); {said}. Until it confirms it receives no mesh traffic. "
            f"If the agent does not pick the certificate up: {RUN_AGENT_REMEDY}; the agent's log is "
            "`journalctl -t meshjoin`")


def serving_lag_warning(serving: str, delivered: Delivered) -> str:
    return (f"the VM serves certificate {serving}, not {delivered.serial} that meshjoin delivered (valid until "
            f"{rfc3339(delivered.not_after)}): its watcher did not install it, so the VM loses its identity when the "
            f"certificate it serves expires; on the VM: `sudo systemctl restart meshjoin-watch.service` "
            f"(`journalctl -t meshjoin` says why it stopped)")


def agent_field(report: AgentReport | None, confirmed_serial: str | None, read: bool,
                recorded: str | None) -> str | None:
    """The status's `agent` field: the VM's report as read this pass; left out when it only repeats
    confirmedSerial with a running sidecar (the status is listed with every VM: 4 kB each); the recorded
    one when this pass did not read the guest attributes."""
    if report is None:
        return None if read else recorded
    if confirmed_serial and report.cert_serial == confirmed_serial and report.sidecar == "running":
        return None
    return report.describe()


def no_key_reason(spiffe: str, problem: str, report: AgentReport | None) -> str:
    """Why nothing was signed for a VM that needs its first certificate, and what its owner can do."""
    said = f"; {report.describe()}" if report else ""
    return (f"waiting for the VM's key: meshjoin grants {spiffe} but {problem}{said}. The VM's agent makes its key "
            f"on the VM and writes a CSR for it to {CSR_WHERE}; until a valid one is certified and confirmed the VM "
            f"receives no mesh traffic. {RUN_AGENT_REMEDY}; the agent's log is `journalctl -t meshjoin`")


def csr_problem(csr: pki.VerifiedCsr | pki.CsrError | None) -> str:
    if csr is None:
        return f"the VM's agent has not written its CSR ({CSR_WHERE}) yet"
    return f"its CSR ({CSR_WHERE}) was refused: {csr}"


def needs_new_cert(delivered: Delivered | None, *, vm: Vm, spiffe: str, ca_fingerprint: str, now: datetime,
                   settings: Settings, csr_key_id: str | None = None, force: bool = False) -> Cause | None:
    """Why the VM needs a certificate now, or None. Pure.

    `csr_key_id`: the key of the VM's valid CSR, when its guest attributes were read (None: not read,
    or no valid CSR). A CSR for another key than the certified one is a new key: the agent rotated
    (asked to, or on its own).
    """
    if delivered is None:
        return Cause.NO_CERT
    if delivered.instance_id != vm.instance_id:
        return Cause.RECREATED
    if csr_key_id is not None and csr_key_id != delivered.key_id:
        return Cause.NEW_KEY
    if delivered.spiffe != spiffe:
        return Cause.IDENTITY_CHANGED
    if force:
        return Cause.FORCED
    if delivered.ca_fingerprint != ca_fingerprint:
        return Cause.CA_CHANGED
    if pki.needs_renewal(delivered.not_before, delivered.not_after, now,
                         renew_fraction=settings.renew_fraction,
                         jitter_fraction=settings.renew_jitter_fraction, jitter_key=str(vm.key)):
        return Cause.RENEWAL_DUE
    return None


def key_to_certify(why: Cause, recorded: Delivered | None,
                   csr: pki.VerifiedCsr | pki.CsrError | None) -> pki.VerifiedCsr | str:
    """The CSR whose key meshjoin signs for `why`, or the problem that stops it. Pure.

    Only a key the VM proved it holds (a valid CSR in its own guest attributes) is ever certified.
    A recreated or cloned VM starts as a first delivery, and the key certified for the VM its status
    was copied from is refused: a copy of another VM's disk (and key) never inherits its certificate.
    """
    if not isinstance(csr, pki.VerifiedCsr):
        return csr_problem(csr)
    if why == Cause.RECREATED and recorded is not None and csr.key_id == recorded.key_id:
        return (f"its CSR is for key {csr.key_id}, certified for the VM this one was copied from (instance "
                f"{recorded.instance_id[:24]}); agent 3 makes a fresh key when the instance id changes")
    return csr


def rekey_pending(token: str | None, key_id: str) -> bool:
    """Whether the rotation meshjoin last asked for still waits: tokens name the key they replace."""
    return bool(token) and token.startswith(key_id + ".")


def rekey_token(why: Cause, key_certs: int, key_id: str, current: str | None, settings: Settings,
                now: datetime) -> str | None:
    """The `meshjoin-rekey` token after re-certifying key `key_id` for `why` (its `key_certs`-th certificate). Pure.

    A new token asks the agent for a new key: when re-certifications of one key would exceed
    MESHJOIN_KEY_ROTATION_RENEWALS, and when the identity changed (the key served the old one).
    One request at a time: a pending one is kept. 0 disables requests.
    """
    limit = settings.key_rotation_renewals
    if limit <= 0 or not why.same_key or rekey_pending(current, key_id):
        return current
    if why == Cause.IDENTITY_CHANGED or key_certs > limit:
        return f"{key_id}.{now.strftime('%Y%m%dT%H%M%SZ')}"
    return current


def has_traces(vm: Vm) -> bool:
    """Whether meshjoin left anything on this VM that a leave must clean up."""
    if any(k in vm.metadata for k in names.MESHJOIN_KEYS if k != names.STATUS_KEY):
        return True
    return Status.decode(vm.metadata.get(names.STATUS_KEY)).state in (State.JOINED, State.WAITING, State.ERROR)


def is_legacy(vm: Vm) -> bool:
    """A VM meshjoin 2 joined: its key is in a per-VM secret named by `meshjoin-secret`."""
    return names.SECRET_KEY in vm.metadata


class Reconciler:
    def __init__(self, settings: Settings, compute: ComputeAdapter, secrets: SecretsAdapter, kube: KubeAdapter,
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
        if not vm.wants_mesh:
            if not has_traces(vm):
                if cleanup or legacy_secret:
                    self._remove_registration(key, legacy_secret=legacy_secret)
                    return Outcome(Verb.LEFT, "the VM is not labelled mesh=join")
                return Outcome(Verb.IGNORED, "the VM is not labelled mesh=join")
            self._remove_registration(key, legacy_secret=legacy_secret)
            self._write_status(vm, State.LEFT, "the label mesh=join was removed", remove_bootstrap=True)
            return Outcome(Verb.LEFT, "the label mesh=join was removed", state=State.LEFT)
        decision = decide_identity(vm, self.settings)
        if isinstance(decision, Denial):
            return self._deny(vm, decision, cleanup, legacy_secret)
        if vm.status in STOPPED_STATES:
            return self._stopped(vm)
        return self._join(vm, decision, force, read_agent)

    # --- join -----------------------------------------------------------------------------------

    def _join(self, vm: Vm, identity: Identity, force: bool, read_agent: bool) -> Outcome:
        now = self.clock()
        ca = self.secrets.plugin_ca()
        spiffe = identity.spiffe(self.settings.trust_domain)
        status = Status.decode(vm.metadata.get(names.STATUS_KEY))
        # A legacy item on a copy of a VM (its status names another instance) names another VM's secret:
        # it goes at once. Only the VM it was written for keeps it until agent 3 has taken over.
        legacy = is_legacy(vm) and status.instance_id == vm.instance_id
        # What the status records; a status copied from another VM (a clone, a machine image) is not this
        # VM's: it starts as a first delivery.
        recorded = Delivered.from_status(status)
        delivered = recorded if recorded is not None and recorded.instance_id == vm.instance_id else None
        token = status.rekey if REKEY_TOKEN.fullmatch(status.rekey or "") else None
        same_vm = status.names_vm(vm.instance_id, spiffe)
        was_confirmed = status.state == State.JOINED and bool(status.confirmed_serial) and same_vm

        # The VM's own words, read only when they can change something (the sweep's pass over a
        # confirmed VM with nothing due reads none).
        due = needs_new_cert(recorded, vm=vm, spiffe=spiffe, ca_fingerprint=ca.fingerprint, now=now,
                             settings=self.settings, force=force)
        pending = delivered is not None and rekey_pending(token, delivered.key_id)
        report, csr = None, None
        # A VM that carries no meshjoin item at all was never bootstrapped: agent 3 writes its CSR only once it has
        # read the bootstrap, and deletes it when the bootstrap goes (a VM that left keeps its status item), so
        # there is nothing to read yet. Its owner can remove every item to skip this read: that only delays the
        # certificate of their own VM (its agent's nudge, or the sweep, reads at the next pass).
        fresh = not any(k in vm.metadata for k in names.MESHJOIN_KEYS)
        read = not fresh and (read_agent or not was_confirmed or due is not None or pending or legacy)
        if read:
            attributes = self.compute.guest_attributes(vm.key)
            report = AgentReport.from_attributes(attributes)
            csr = read_csr(attributes, self.settings.key_algorithm)
        why = needs_new_cert(recorded, vm=vm, spiffe=spiffe, ca_fingerprint=ca.fingerprint, now=now,
                             settings=self.settings, force=force,
                             csr_key_id=csr.key_id if isinstance(csr, pki.VerifiedCsr) else None)
        if why is not None and why.first_delivery and not (legacy and why == Cause.NO_CERT):
            was_confirmed = False  # a new VM, a copy of one, or a new identity confirms afresh

        # The pass that wrote a `waiting` status for this VM and identity checked that the entry name is free or
        # meshjoin's (below): a first delivery after it does not repeat the GET. A status forged `waiting` skips
        # only this courtesy check for its own VM: the registration itself never replaces an entry meshjoin did
        # not make (KubeAdapter.apply_owned), whatever the status says.
        entry_checked = status.state == State.WAITING and same_vm

        issued: pki.IssuedCert | None = None
        problem = None
        if why:
            choice = key_to_certify(why, recorded, csr)
            if isinstance(choice, str):
                problem = choice
            else:
                if why is not None and why.first_delivery and not entry_checked:
                    self._refuse_a_foreign_entry(vm, identity)
                issued = pki.certify(ca.bundle, choice.public_key, spiffe, now=now, ttl=self.settings.cert_ttl,
                                     backdate=min(MAX_BACKDATE, self.settings.cert_ttl / 10))
                same_key = delivered is not None and delivered.key_id == issued.key_id
                key_certs = delivered.key_certs + 1 if same_key else 1
                token = rekey_token(why, key_certs, issued.key_id, token, self.settings, now) if same_key else token
                delivered = Delivered(spiffe, vm.instance_id, ca.fingerprint, issued.key_id, issued.not_before,
                                      issued.not_after, serial_hex(issued.serial), key_certs)
                log("INFO", f"certified key {issued.key_id} as {spiffe} ({why})", key=vm.key, outcome="certified",
                    keyId=issued.key_id, certSerial=delivered.serial)
        if delivered is None and not entry_checked:
            # Before a first bootstrap: the entry name the VM will register under must be free or meshjoin's,
            # or its owner would wait for a join that can never complete.
            self._refuse_a_foreign_entry(vm, identity)
        if why == Cause.IDENTITY_CHANGED and issued is None:
            delivered = None  # never recorded under the new identity: certified once the VM's CSR is valid

        # The VM's own truth: until its agent confirms, meshjoin has done its part but the VM serves nothing.
        confirmed_serial = status.confirmed_serial if was_confirmed else None
        migrated = False
        if issued is None and delivered is not None and confirmed(report, delivered.serial):
            migrated = legacy  # agent 3 serves the certificate meshjoin signed for its own key
            if not was_confirmed or legacy:
                confirmed_serial = delivered.serial
        is_joined = confirmed_serial is not None

        warnings = []
        if is_default_compute_account(vm.service_account):  # bound on purpose by an operator, still risky
            warnings.append("the VM runs as the project's default compute service account, which other VMs "
                            "share: any of them could ask for this identity; give it a dedicated service account")
        if was_confirmed and recorded is not None and report is not None and report.cert_serial and \
                report.cert_serial != recorded.serial:
            # istio-agent never renews by itself (file-mounted certificates): a VM whose watcher stopped
            # keeps serving an older certificate until it expires, while it still counts as joined.
            warnings.append(serving_lag_warning(report.cert_serial, recorded))
        items, remove = self._bootstrap(vm, identity, ca.bundle.root_certs_pem, warnings)
        if issued is not None:
            items[names.CERT_CHAIN_KEY] = issued.chain_pem
        if why == Cause.RECREATED and issued is None:
            remove |= {names.CERT_CHAIN_KEY, names.REKEY_KEY}  # the VM's it was copied from: not this one's
        if delivered is None:
            token = None
        elif token:
            items[names.REKEY_KEY] = token
        if legacy and not migrated and delivered is None:
            # Agent 2 keeps serving from its secret (istio-agent renews through istiod as before) until the
            # VM boots agent 3: only the new script and what agent 3 needs first change now.
            items = {k: v for k, v in items.items()
                     if k in (names.STARTUP_SCRIPT_KEY, names.KEY_ALGORITHM_KEY, names.GUEST_ATTRIBUTES_KEY)}
            remove &= {names.STARTUP_SCRIPT_KEY}
        if migrated or (is_legacy(vm) and not legacy):
            remove.add(names.SECRET_KEY)

        applied = False
        if is_joined:
            not_after = delivered.not_after if delivered else _legacy_not_after(status, now)
            entry, applied = self._register(vm, identity, not_after, previous=status.workload_entry)
            state = State.JOINED
        else:
            self._withdraw_entry(vm.key, status.workload_entry)
            entry = None
            state = State.WAITING
        reason = self._reason(state, spiffe, why, issued, delivered, problem, report, was_confirmed, legacy,
                              migrated)
        if delivered is not None and rekey_pending(token, delivered.key_id):
            # Joined, the current key serves until the new one is certified: short, since the status is listed
            # with every VM (4 kB each); `meshjoin explain` gives the remedy. A waiting VM's reason keeps it.
            reason += f"; meshjoin asked the VM for a new key ({names.REKEY_KEY})" if state == State.JOINED else \
                (f"; meshjoin asked the VM for a new key ({names.REKEY_KEY}={token}): its agent makes it and "
                 f"hands in its CSR, the current key serves until then; if nothing comes: {RUN_AGENT_REMEDY}")
        if problem and why and delivered is not None:
            # Recorded as a warning too: a reason alone does not rewrite the status its owner reads.
            warnings.append(f"{why} but nothing was certified: {problem}")
            log("WARNING", f"{why} but nothing was certified: {problem}", key=vm.key, outcome="waiting")
        elif isinstance(csr, pki.CsrError) and delivered is not None:
            # Nothing was due, but the key the agent hands in (a rotation) cannot be certified: say why.
            warnings.append(f"the VM's new CSR ({CSR_WHERE}) was refused: {csr}")
        waiting_since = None
        if state == State.WAITING:
            waiting_since = status.waiting_since if status.state == State.WAITING and same_vm \
                and issued is None else rfc3339(now)
        cert = delivered is not None
        status_fields = dict(
            identity=spiffe, workload_entry=entry, instance_id=vm.instance_id, address=vm.network_ip,
            ca_fingerprint=delivered.ca_fingerprint if cert else None,
            cert_not_before=rfc3339(delivered.not_before) if cert else None,
            cert_not_after=rfc3339(delivered.not_after) if cert else
            (status.cert_not_after if legacy else None),  # agent 2's, for the entry it keeps
            cert_serial=(delivered.serial or None) if cert else None,
            key_id=delivered.key_id if cert else None, key_certs=str(delivered.key_certs) if cert else None,
            rekey=token, confirmed_serial=confirmed_serial, waiting_since=waiting_since,
            agent=agent_field(report, confirmed_serial, read, status.agent),
            warnings=warnings or None)
        try:
            # An entry this pass applied is fenced by the fingerprint read at its start: the metadata write is
            # made even when nothing else changed, so a pass that lost a race (a `leave`, a stop) learns it.
            changed = self._write_metadata(vm, items, state, reason, status_fields, remove=frozenset(remove),
                                           always=applied)
        except StaleFingerprint:
            if applied:
                # What this pass decided is stale: its entry goes, the next pass re-decides from what it reads.
                self._withdraw_entry(vm.key, entry)
            raise
        if migrated:
            if self.secrets.delete_vm_secret(vm.key):
                log("INFO", "migrated to agent 3: the legacy per-VM secret was deleted", key=vm.key, outcome="pruned")
            verb = Verb.MIGRATED
        elif issued is not None:
            verb = why.verb if is_joined else Verb.DELIVERED
        elif is_joined and not was_confirmed:
            verb = Verb.REGISTERED
        elif legacy and changed:
            verb = Verb.MIGRATING
        elif not is_joined:
            verb = Verb.BOOTSTRAPPED if changed and delivered is None else Verb.RECHECKED
        else:
            verb = Verb.REFRESHED if changed else Verb.UNCHANGED
        return Outcome(verb, reason, state=state, details=wire_fields(status_fields))

    def _reason(self, state: State, spiffe: str, why: Cause | None, issued, delivered: Delivered | None,
                problem: str | None, report: AgentReport | None, was_confirmed: bool, legacy: bool,
                migrated: bool) -> str:
        if migrated:
            return f"joined as {spiffe}: migrated to agent 3, which serves a key made on the VM; the per-VM secret is gone"
        if legacy and delivered is None:
            return (f"migrating: agent 3 takes over at the VM's next boot (it makes its key on the VM; the per-VM "
                    f"secret is deleted once it confirmed); until then agent 2 keeps serving {spiffe}. "
                    f"{RUN_AGENT_REMEDY} to switch now" + (f"; {problem}" if problem and report else ""))
        if state == State.WAITING:
            if delivered is None:
                return no_key_reason(spiffe, problem or csr_problem(None), report)
            text = waiting_reason(spiffe, delivered.serial, report)
            return f"{text}; {why}: {problem}" if problem else text
        # The identity is the status's own `identity` field: not repeated here (4 kB of metadata a VM).
        text = "joined" + (f" ({why})" if issued is not None else "") + \
            ("; the VM confirmed it" if not was_confirmed else "")
        if problem and delivered is not None:
            text += (f"; {why} but nothing was certified: {problem}; the certificate expires at "
                     f"{rfc3339(delivered.not_after)}")
        return text

    def _bootstrap(self, vm: Vm, identity: Identity, root_pem: str, warnings: list[str]) -> tuple[dict, set]:
        """The bootstrap items for this VM, minus what belongs to its owner (their startup-script, their
        guest-attributes switch), with the warnings that explain it."""
        items = bootstrap.bootstrap_items(vm.key, identity, self.settings, root_pem=root_pem)
        # What every VM shares is in project metadata now: a copy meshjoin wrote on this VM before would shadow
        # the project's value forever (the agent reads the instance's first).
        remove: set[str] = {k for k in names.DEPLOYMENT_KEYS if k in vm.metadata}
        own_script = vm.metadata.get(names.STARTUP_SCRIPT_KEY)
        if own_script is not None and names.STARTUP_SCRIPT_MARKER not in own_script:
            items.pop(names.STARTUP_SCRIPT_KEY)  # the owner's own script: never overwritten
            warnings.append("startup-script belongs to the VM owner and was kept; run the meshjoin agent "
                            f"({AGENT_PATH}) from it")
        elif project_startup_script(self.compute.project_metadata(vm.key.project)):
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
                                "the VM's agent can neither hand in its key nor confirm, so the VM receives no "
                                "mesh traffic")
        return items, remove

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
        ref = f"{meta['namespace']}/{meta['name']}"
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
        same_status = Status.decode(vm.metadata.get(names.STATUS_KEY)).facts == new_status.facts
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


def _legacy_not_after(status: Status, now: datetime) -> datetime:
    """The legacy certificate's end, for the entry's annotation while agent 2 still serves (now if unknown)."""
    return time_or_none(status.cert_not_after) or now
