"""What one VM needs, decided from facts alone: why it needs a certificate, what a pass does about it, and
what that pass did. Pure: no call to any API, no clock (time is a fact).

The reconcile (and the sweep, which plans from its listings) reads the facts; `plan_join` turns them into
steps: check that the entry name is free, certify the VM's key, register or withdraw its entry, write
its metadata, delete a legacy secret. `Reconciler` performs the steps in that order. The vocabulary is
typed: a `Cause` carries the sentence the VM owner reads in its status (the same words as ever), a `Verb`
is the past-tense outcome a log line and the CLI report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property
from typing import Mapping

from . import bootstrap, names, pki, registration
from .model import Denial, Identity, Vm
from .policy import decide_identity, is_default_compute_account
from .settings import Settings
from .status import Delivered, State, Status, normalize_serial, rfc3339, time_or_none

SIDECAR_STATES = frozenset({"running", "stopped", "failed"})
RUN_AGENT_REMEDY = ("GCE runs startup-script only at boot: reboot the VM, or run "
                    "`sudo google_metadata_script_runner startup` on it")
CSR_WHERE = f"guest attribute {names.GUEST_NAMESPACE}/{names.CSR_ATTRIBUTE}"
# A VM in these states serves nothing: it is not routed (and not renewed) until it runs again.
STOPPED_STATES = frozenset({"STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"})
MAX_BACKDATE = timedelta(minutes=5)  # tolerate VM clock skew without eating short test TTLs
# `meshjoin-rekey` tokens: opaque to the agent, which only compares them with the last one it acted on.
REKEY_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Verb(StrEnum):
    """What one reconcile (or a sweep's own work) did: a log line's `outcome`."""

    REGISTERED = "registered"  # the VM confirmed: its WorkloadEntry exists
    BOOTSTRAPPED = "bootstrapped"  # first items written, waiting for the VM's key
    DELIVERED = "delivered"  # a certificate delivered, waiting for the VM to confirm it
    RECHECKED = "rechecked"  # still waiting, nothing new from the VM
    RENEWED = "renewed"
    REISSUED = "reissued"
    ROTATED = "rotated"
    MIGRATED = "migrated"
    MIGRATING = "migrating"
    REFRESHED = "refreshed"
    UNCHANGED = "unchanged"
    STOPPED = "stopped"
    LEFT = "left"
    DENIED = "denied"
    IGNORED = "ignored"
    FAILED = "failed"
    # The sweep's own work (not a reconcile's).
    PRUNED = "pruned"
    DEFERRED = "deferred"


class Cause(StrEnum):
    """Why a VM needs a certificate now. The value is the sentence its owner reads."""

    NO_CERT = "no certificate delivered yet"
    RECREATED = "the VM was recreated or cloned (its instance id changed)"
    IDENTITY_CHANGED = "the identity changed"
    NEW_KEY = "the VM presents a new key"
    FORCED = "an operator forced a new certificate"
    CA_CHANGED = "the CA changed"
    RENEWAL_DUE = "the certificate reached its renewal point"

    @property
    def first_delivery(self) -> bool:
        """Starts the VM's confirmation anew (a new VM, a copy of one, or a new identity)."""
        return self in (Cause.NO_CERT, Cause.RECREATED, Cause.IDENTITY_CHANGED)

    @property
    def same_key(self) -> bool:
        """Re-certifies the key already certified (the VM need not act)."""
        return self in (Cause.IDENTITY_CHANGED, Cause.FORCED, Cause.CA_CHANGED, Cause.RENEWAL_DUE)

    @property
    def verb(self) -> Verb:
        """What certifying for this cause did, for a VM that stays joined."""
        return _VERB_BY_CAUSE.get(self, Verb.DELIVERED)


_VERB_BY_CAUSE = {Cause.RENEWAL_DUE: Verb.RENEWED, Cause.FORCED: Verb.RENEWED, Cause.CA_CHANGED: Verb.REISSUED,
                  Cause.NEW_KEY: Verb.ROTATED}


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


def rekey_token_of(status: Status) -> str | None:
    """The status's rotation request as meshjoin writes it; anything else (the owner's) is no request."""
    return status.rekey if REKEY_TOKEN.fullmatch(status.rekey or "") else None


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
    return Status.of(vm).state in (State.JOINED, State.WAITING, State.ERROR)


def is_legacy(vm: Vm) -> bool:
    """A VM meshjoin 2 joined: its key is in a per-VM secret named by `meshjoin-secret`."""
    return names.SECRET_KEY in vm.metadata


AGENT_PATH = "/usr/local/sbin/meshjoin-agent"


def project_startup_script(project_metadata: dict[str, str]) -> bool:
    """Whether the project runs a startup-script of its own on every VM (not one meshjoin rendered)."""
    script = project_metadata.get(names.STARTUP_SCRIPT_KEY)
    return script is not None and names.STARTUP_SCRIPT_MARKER not in script


# --- what a pass does for one VM --------------------------------------------------------------------


@dataclass(frozen=True)
class Leave:
    """The VM is not labelled mesh=join: what meshjoin left on it goes."""


@dataclass(frozen=True)
class Deny:
    denial: Denial


@dataclass(frozen=True)
class Stop:
    """The VM policy allows is stopped: out of routing, its bootstrap and key stay."""

    identity: Identity


@dataclass(frozen=True)
class Join:
    identity: Identity


def course(vm: Vm, settings: Settings) -> Leave | Deny | Stop | Join:
    """What meshjoin does with a VM that exists, from its labels, policy and run state. Pure."""
    return labelled_course(vm, settings) if vm.wants_mesh else Leave()


def labelled_course(vm: Vm, settings: Settings) -> Deny | Stop | Join:
    """The course of a VM labelled mesh=join (the sweep's listing holds only those: a server-side filter)."""
    decision = decide_identity(vm, settings)
    if isinstance(decision, Denial):
        return Deny(decision)
    if vm.status in STOPPED_STATES:
        return Stop(decision)
    return Join(decision)


@dataclass(frozen=True)
class AgentWords:
    """What the VM's agent said in its guest attributes `meshjoin/*` this pass: its report and its CSR."""

    report: AgentReport | None = None
    csr: pki.VerifiedCsr | pki.CsrError | None = None

    @classmethod
    def from_attributes(cls, attributes: dict[str, str], allowed_algorithm: str) -> "AgentWords":
        return cls(AgentReport.from_attributes(attributes), read_csr(attributes, allowed_algorithm))


@dataclass(frozen=True)
class JoinFacts:
    """Everything a join pass decides from. `agent` None: the guest attributes were not read (reads_agent);
    `issued` None: nothing was certified yet this pass (the Certify step's result comes back as a fact)."""

    vm: Vm
    identity: Identity
    status: Status
    ca_fingerprint: str
    root_pem: str
    now: datetime
    settings: Settings
    force: bool = False
    project_script: bool = False  # the project's metadata runs a startup-script of its own
    agent: AgentWords | None = None
    issued: pki.IssuedCert | None = None

    @cached_property
    def spiffe(self) -> str:
        return self.identity.spiffe(self.settings.trust_domain)

    @cached_property
    def legacy(self) -> bool:
        """A legacy item on a copy of a VM (its status names another instance) names another VM's secret: it
        goes at once. Only the VM it was written for keeps it until agent 3 has taken over."""
        return is_legacy(self.vm) and self.status.instance_id == self.vm.instance_id

    @cached_property
    def recorded(self) -> Delivered | None:
        """What the status records (maybe copied from another VM: a clone, a machine image)."""
        return Delivered.from_status(self.status)

    @cached_property
    def delivered(self) -> Delivered | None:
        """What the status records for this VM (a copied status starts as a first delivery)."""
        recorded = self.recorded
        return recorded if recorded is not None and recorded.instance_id == self.vm.instance_id else None

    @cached_property
    def token(self) -> str | None:
        return rekey_token_of(self.status)

    @cached_property
    def same_vm(self) -> bool:
        return self.status.names_vm(self.vm.instance_id, self.spiffe)

    @cached_property
    def entry_checked(self) -> bool:
        """The pass that wrote a `waiting` status for this VM and identity checked that the entry name is free or
        meshjoin's: a first delivery after it does not repeat the GET. A status forged `waiting` skips only this
        courtesy check for its own VM: the registration itself never replaces an entry meshjoin did not make
        (Kube.apply_owned), whatever the status says."""
        return self.status.state == State.WAITING and self.same_vm

    @cached_property
    def was_confirmed(self) -> bool:
        """The status says this VM incarnation confirmed a certificate of this identity."""
        return self.status.state == State.JOINED and bool(self.status.confirmed_serial) and self.same_vm

    def due(self, csr_key_id: str | None = None) -> Cause | None:
        return needs_new_cert(self.recorded, vm=self.vm, spiffe=self.spiffe, ca_fingerprint=self.ca_fingerprint,
                              now=self.now, settings=self.settings, csr_key_id=csr_key_id, force=self.force)


def reads_agent(facts: JoinFacts, always: bool) -> bool:
    """Whether the pass reads the VM's guest attributes: only when they can change something (the sweep's
    pass, `always` False, over a confirmed VM with nothing due reads none). Pure.

    A VM that carries no meshjoin item at all was never bootstrapped: agent 3 writes its CSR only once it has
    read the bootstrap, and deletes it when the bootstrap goes (a VM that left keeps its status item), so there
    is nothing to read yet. Its owner can remove every item to skip this read: that only delays the certificate
    of their own VM (its agent's nudge, or the sweep, reads at the next pass)."""
    if not any(k in facts.vm.metadata for k in names.MESHJOIN_KEYS):
        return False
    pending = facts.delivered is not None and rekey_pending(facts.token, facts.delivered.key_id)
    return always or not facts.was_confirmed or facts.due() is not None or pending or facts.legacy


# The steps, in the order the executor performs them.


@dataclass(frozen=True)
class CheckEntryName:
    """Refuse (ConflictError) when the entry name the VM will register under belongs to someone else."""


@dataclass(frozen=True)
class Certify:
    """Sign the CSR's public key for `spiffe`; the certificate comes back as JoinFacts.issued."""

    csr: pki.VerifiedCsr
    spiffe: str
    why: Cause


@dataclass(frozen=True)
class Register:
    """ServiceAccount, the VM's WorkloadEntry (annotated with `not_after`), its Service; the entry a status
    named in another namespace (`previous`) goes."""

    not_after: datetime
    previous: str | None


@dataclass(frozen=True)
class Withdraw:
    """The entry the status names goes: an unconfirmed VM is selected by no Service."""

    entry: str | None


@dataclass(frozen=True)
class LogWarning:
    message: str


@dataclass(frozen=True)
class WriteMetadata:
    """One setMetadata: `items` and the status, without `remove`. Skipped when nothing but the status's time
    and prose would change, unless a Register of this pass applied its entry: then it is always made (it
    fences the entry with the fingerprint the pass read) and a 412 withdraws that entry."""

    items: Mapping[str, str]
    remove: frozenset[str]
    state: State
    reason: str
    fields: Mapping[str, object]  # the status's fields (status.written), by field name


@dataclass(frozen=True)
class DeleteLegacySecret:
    """The meshjoin 2 per-VM secret of a VM agent 3 now serves."""


Step = CheckEntryName | Certify | Register | Withdraw | LogWarning | WriteMetadata | DeleteLegacySecret


@dataclass(frozen=True)
class JoinPlan:
    steps: tuple[Step, ...]
    state: State | None = None  # None: a Certify is pending, plan again with its result
    reason: str = ""
    verb_if_written: Verb = Verb.UNCHANGED  # the outcome when the metadata write was made ...
    verb_if_not: Verb = Verb.UNCHANGED  # ... and when it was skipped (nothing changed)

    @property
    def certify(self) -> Certify | None:
        return next((s for s in self.steps if isinstance(s, Certify)), None)

    @property
    def write(self) -> WriteMetadata | None:
        return next((s for s in self.steps if isinstance(s, WriteMetadata)), None)


def plan_join(facts: JoinFacts) -> JoinPlan:
    """The steps of one join pass for a VM policy allows. Pure.

    Write order makes every prefix of a pass safe to repeat: the entry-name check, the certificate (public,
    undelivered until the metadata write), cluster objects (only for a confirmed VM), then the instance
    metadata with the status last, so `joined` is only ever claimed once everything it names exists.
    When a certificate is to be signed the plan stops at Certify: plan again with `issued` set.
    """
    agent = facts.agent or AgentWords()
    why = facts.due(agent.csr.key_id if isinstance(agent.csr, pki.VerifiedCsr) else None)
    certificate = _certificate(facts, why, agent.csr)
    if isinstance(certificate, JoinPlan):
        return certificate
    return _rest_of_the_pass(facts, why, agent, certificate)


@dataclass(frozen=True)
class _Certificate:
    """The certificate the VM holds after this pass's signing (None: none yet), its rotation request, and
    why nothing was signed when something was due."""

    delivered: Delivered | None
    token: str | None
    problem: str | None


def _certificate(facts: JoinFacts, why: Cause | None,
                 csr: pki.VerifiedCsr | pki.CsrError | None) -> _Certificate | JoinPlan:
    """What is due, signed: a plan that signs first (`facts.issued` None), or the certificate it made."""
    delivered, token, issued, problem = facts.delivered, facts.token, facts.issued, None
    if why is not None:
        choice = key_to_certify(why, facts.recorded, csr)
        if isinstance(choice, str):
            problem = choice
        elif issued is None:
            check = [CheckEntryName()] if why.first_delivery and not facts.entry_checked else []
            return JoinPlan((*check, Certify(choice, facts.spiffe, why)))
        else:
            same_key = delivered is not None and delivered.key_id == issued.key_id
            key_certs = delivered.key_certs + 1 if same_key else 1
            if same_key:
                token = rekey_token(why, key_certs, issued.key_id, token, facts.settings, facts.now)
            delivered = Delivered(facts.spiffe, facts.vm.instance_id, facts.ca_fingerprint, issued.key_id,
                                  issued.not_before, issued.not_after, serial_hex(issued.serial), key_certs)
    if issued is not None and (why is None or problem is not None):
        raise ValueError("a certificate was issued that this plan does not ask for")
    return _Certificate(delivered, token, problem)


def _rest_of_the_pass(facts: JoinFacts, why: Cause | None, agent: AgentWords, certificate: _Certificate) -> JoinPlan:
    vm, status, issued, report = facts.vm, facts.status, facts.issued, agent.report
    delivered, problem = certificate.delivered, certificate.problem
    # Before a first bootstrap: the entry name the VM will register under must be free or meshjoin's, or its
    # owner would wait for a join that can never complete.
    steps: list[Step] = [CheckEntryName()] if delivered is None and not facts.entry_checked else []
    if why == Cause.IDENTITY_CHANGED and issued is None:
        delivered = None  # never recorded under the new identity: certified once the VM's CSR is valid
    token = certificate.token if delivered is not None else None
    # A new VM, a copy of one, or a new identity confirms afresh.
    was_confirmed = facts.was_confirmed and not (why is not None and why.first_delivery and
                                                 not (facts.legacy and why == Cause.NO_CERT))
    # The VM's own truth: until its agent confirms, meshjoin has done its part but the VM serves nothing.
    confirmed_serial = status.confirmed_serial if was_confirmed else None
    migrated = False
    if issued is None and delivered is not None and confirmed(report, delivered.serial):
        migrated = facts.legacy  # agent 3 serves the certificate meshjoin signed for its own key
        if not was_confirmed or facts.legacy:
            confirmed_serial = delivered.serial
    state = State.JOINED if confirmed_serial is not None else State.WAITING

    warnings = _serving_warnings(facts, was_confirmed, report)
    items, remove = _metadata(facts, why, delivered, token, migrated, warnings)
    if state == State.JOINED:
        entry = registration.entry_ref(vm.key, facts.identity)
        not_after = delivered.not_after if delivered else legacy_not_after(status, facts.now)
        steps.append(Register(not_after, previous=status.workload_entry))
    else:
        entry = None
        steps.append(Withdraw(status.workload_entry))
    reason = join_reason(state, facts.spiffe, why, issued, delivered, problem, report, was_confirmed, facts.legacy,
                         migrated) + _rekey_reason(state, delivered, token)
    if problem and why and delivered is not None:
        # Recorded as a warning too: a reason alone does not rewrite the status its owner reads.
        warnings.append(f"{why} but nothing was certified: {problem}")
        steps.append(LogWarning(warnings[-1]))
    elif isinstance(agent.csr, pki.CsrError) and delivered is not None:
        # Nothing was due, but the key the agent hands in (a rotation) cannot be certified: say why.
        warnings.append(f"the VM's new CSR ({CSR_WHERE}) was refused: {agent.csr}")
    waiting_since = None
    if state == State.WAITING:
        waiting_since = status.waiting_since if status.state == State.WAITING and facts.same_vm \
            and issued is None else rfc3339(facts.now)
    recorded_cert = delivered.recorded() if delivered is not None else {
        "cert_not_after": status.cert_not_after if facts.legacy else None}  # agent 2's, for the entry it keeps
    fields = dict(identity=facts.spiffe, workload_entry=entry, instance_id=vm.instance_id, address=vm.network_ip,
                  **(dict.fromkeys(_CERT_FIELDS) | recorded_cert), rekey=token,
                  confirmed_serial=confirmed_serial, waiting_since=waiting_since,
                  agent=agent_field(report, confirmed_serial, facts.agent is not None, status.agent),
                  warnings=warnings or None)
    steps.append(WriteMetadata(items, frozenset(remove), state, reason, fields))
    if migrated:
        steps.append(DeleteLegacySecret())
    written, not_written = (_join_verb(changed, state, why, issued, was_confirmed, migrated, facts.legacy,
                                       delivered) for changed in (True, False))
    return JoinPlan(tuple(steps), state, reason, written, not_written)


def _serving_warnings(facts: JoinFacts, was_confirmed: bool, report: AgentReport | None) -> list[str]:
    warnings = []
    if is_default_compute_account(facts.vm.service_account):  # bound on purpose by an operator, still risky
        warnings.append("the VM runs as the project's default compute service account, which other VMs "
                        "share: any of them could ask for this identity; give it a dedicated service account")
    recorded = facts.recorded
    if was_confirmed and recorded is not None and report is not None and report.cert_serial and \
            report.cert_serial != recorded.serial:
        # istio-agent never renews by itself (file-mounted certificates): a VM whose watcher stopped keeps
        # serving an older certificate until it expires, while it still counts as joined.
        warnings.append(serving_lag_warning(report.cert_serial, recorded))
    return warnings


def _metadata(facts: JoinFacts, why: Cause | None, delivered: Delivered | None, token: str | None, migrated: bool,
              warnings: list[str]) -> tuple[dict[str, str], set[str]]:
    """The VM's items to write and to remove after this pass (the status aside)."""
    items, remove = bootstrap_for(facts, warnings)
    if facts.issued is not None:
        items[names.CERT_CHAIN_KEY] = facts.issued.chain_pem
    if why == Cause.RECREATED and facts.issued is None:
        remove |= {names.CERT_CHAIN_KEY, names.REKEY_KEY}  # the VM's it was copied from: not this one's
    if token:
        items[names.REKEY_KEY] = token
    if facts.legacy and not migrated and delivered is None:
        # Agent 2 keeps serving from its secret (istio-agent renews through istiod as before) until the VM
        # boots agent 3: only the new script and what agent 3 needs first change now.
        items = {k: v for k, v in items.items()
                 if k in (names.STARTUP_SCRIPT_KEY, names.KEY_ALGORITHM_KEY, names.GUEST_ATTRIBUTES_KEY)}
        remove &= {names.STARTUP_SCRIPT_KEY}
    if migrated or (is_legacy(facts.vm) and not facts.legacy):
        remove.add(names.SECRET_KEY)
    return items, remove


def _rekey_reason(state: State, delivered: Delivered | None, token: str | None) -> str:
    if delivered is None or not rekey_pending(token, delivered.key_id):
        return ""
    # Joined, the current key serves until the new one is certified: short, since the status is listed with
    # every VM (4 kB each); `meshjoin explain` gives the remedy. A waiting VM's reason keeps it.
    if state == State.JOINED:
        return f"; meshjoin asked the VM for a new key ({names.REKEY_KEY})"
    return (f"; meshjoin asked the VM for a new key ({names.REKEY_KEY}={token}): its agent makes it and "
            f"hands in its CSR, the current key serves until then; if nothing comes: {RUN_AGENT_REMEDY}")


_CERT_FIELDS = ("ca_fingerprint", "cert_not_before", "cert_not_after", "cert_serial", "key_id", "key_certs")


def _join_verb(changed: bool, state: State, why: Cause | None, issued: pki.IssuedCert | None, was_confirmed: bool,
               migrated: bool, legacy: bool, delivered: Delivered | None) -> Verb:
    joined = state == State.JOINED
    if migrated:
        return Verb.MIGRATED
    if issued is not None:
        return why.verb if joined else Verb.DELIVERED
    if joined and not was_confirmed:
        return Verb.REGISTERED
    if legacy and changed:
        return Verb.MIGRATING
    if not joined:
        return Verb.BOOTSTRAPPED if changed and delivered is None else Verb.RECHECKED
    return Verb.REFRESHED if changed else Verb.UNCHANGED


def join_reason(state: State, spiffe: str, why: Cause | None, issued: pki.IssuedCert | None,
                delivered: Delivered | None, problem: str | None, report: AgentReport | None, was_confirmed: bool,
                legacy: bool, migrated: bool) -> str:
    """The status's reason after a join pass: what the VM owner reads. Pure."""
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


def needs_project_script(vm: Vm) -> bool:
    """Whether the bootstrap depends on the project's own startup-script (JoinFacts.project_script): unless the
    VM's owner has a script of their own, which is kept whatever the project runs."""
    own_script = vm.metadata.get(names.STARTUP_SCRIPT_KEY)
    return own_script is None or names.STARTUP_SCRIPT_MARKER in own_script


def bootstrap_for(facts: JoinFacts, warnings: list[str]) -> tuple[dict, set]:
    """The bootstrap items for this VM, minus what belongs to its owner (their startup-script, their
    guest-attributes switch), with the warnings that explain it; and the items to remove. Pure."""
    vm = facts.vm
    items = bootstrap.bootstrap_items(vm.key, facts.identity, facts.settings, root_pem=facts.root_pem)
    # What every VM shares is in project metadata now: a copy meshjoin wrote on this VM before would shadow the
    # project's value forever (the agent reads the instance's first).
    remove: set[str] = {k for k in names.DEPLOYMENT_KEYS if k in vm.metadata}
    own_script = vm.metadata.get(names.STARTUP_SCRIPT_KEY)
    if not needs_project_script(vm):
        items.pop(names.STARTUP_SCRIPT_KEY)  # the owner's own script: never overwritten
        warnings.append("startup-script belongs to the VM owner and was kept; run the meshjoin agent "
                        f"({AGENT_PATH}) from it")
    elif facts.project_script:
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


def legacy_not_after(status: Status, now: datetime) -> datetime:
    """The legacy certificate's end, for the entry's annotation while agent 2 still serves (now if unknown)."""
    return time_or_none(status.cert_not_after) or now
