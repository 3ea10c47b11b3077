"""The operator's view of the fleet: rows for `meshjoin status`, reasons for `meshjoin explain`. Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

from . import names
from .model import Denial, Vm, VmKey
from . import pki
from .plan import (CSR_WHERE, RUN_AGENT_REMEDY, AgentReport, Deny, Join, Leave, Stop, course, is_legacy,
                   labelled_course, read_csr, rekey_pending, rekey_token_of)
from .settings import Settings
from .status import Delivered, State, Status
from .sweep import Inventory, entry_key

ATTENTION = {"waiting", "denied", "error", "pending", "orphaned", "expiring"}


@dataclass
class FleetRow:
    name: str
    zone: str
    state: str  # joined | waiting | denied | error | pending | orphaned | left | expiring | unreachable
    namespace: str = ""
    service_account: str = ""
    address: str = ""
    cert_not_after: str = ""
    cert_seconds_left: int | None = None
    updated: str = ""
    reason: str = ""
    agent: str = ""  # the VM agent's own report, as meshjoin last read it
    key_id: str = ""  # the VM's certified key (made on the VM; meshjoin only ever saw its public half)
    key_certs: int | None = None  # certificates issued for that key
    legacy: bool = False  # still keyed from a meshjoin 2 per-VM secret (migrating)
    project: str = ""  # the VM's project (one of MESHJOIN_VM_PROJECTS)

    def as_dict(self) -> dict:
        return asdict(self)


def fleet_rows(inventory: Inventory, now: datetime, settings: Settings) -> list[FleetRow]:
    """Every VM that is labelled or registered, with the state an operator needs to see."""
    rows: list[FleetRow] = []
    for key in sorted(inventory.vms):
        vm = inventory.vms[key]
        status = Status.of(vm)
        state = str(status.state or "pending")
        reason = status.reason if status.reason is not None else "" if status else "no event handled yet"
        match labelled_course(vm, settings):  # the listing holds labelled VMs only
            case Deny(denial) if not denial.account_bound:
                # No status can be written to such a VM: the decision itself is what the operator must see.
                state, reason = "denied", denial.reason
        row = FleetRow(key.instance, key.zone, state, address=vm.network_ip, updated=status.updated or "",
                       reason=reason, project=key.project)
        namespace, _, account = _identity_parts(status.identity or "")
        row.namespace, row.service_account = namespace, account
        row.agent = status.agent or ""
        row.legacy = is_legacy(vm)
        delivered = Delivered.from_status(status)
        if delivered is not None:
            row.key_id, row.key_certs = delivered.key_id, delivered.key_certs
        if delivered and state == State.JOINED:
            row.cert_not_after = status.cert_not_after
            row.cert_seconds_left = int((delivered.not_after - now).total_seconds())
            if row.cert_seconds_left <= 0:
                row.state, row.reason = "expiring", "certificate expired; the next sweep renews it"
        rows.append(row)
    # Legacy per-VM secrets count too: one whose VM is gone is an orphan the sweep prunes.
    registered = {entry_key(e, settings.vm_projects): e for e in inventory.entries} | \
        {k: None for k in inventory.secrets}
    for key in sorted(k for k in registered if k is not None and k not in inventory.vms):
        entry = registered.get(key)
        namespace = entry["metadata"]["namespace"] if entry else ""
        if not inventory.seen(key):
            where = f"project {key.project}" if key.project in inventory.unlisted_projects else f"zone {key.zone}"
            rows.append(FleetRow(key.instance, key.zone, "unreachable", namespace=namespace, project=key.project,
                                 reason=f"{where} did not answer the listing; left as it is"))
            continue
        rows.append(FleetRow(key.instance, key.zone, "orphaned", namespace=namespace, project=key.project,
                             address=(entry or {}).get("spec", {}).get("address", ""),
                             reason="registered but no labelled VM: the next sweep prunes it"))
    return rows


def _identity_parts(spiffe: str) -> tuple[str, str, str]:
    # spiffe://TD/ns/NS/sa/SA
    parts = spiffe.split("/") if isinstance(spiffe, str) else []  # the VM owner can forge the status
    if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa":
        return parts[4], "", parts[6]
    return "", "", ""


@dataclass
class Explanation:
    vm: str
    facts: dict = field(default_factory=dict)
    decision: str = ""
    status: Status = field(default_factory=Status)
    advice: list[str] = field(default_factory=list)


def explain(key: VmKey, vm: Vm | None, settings: Settings, *, entry_exists: bool, now: datetime,
            agent_report: dict[str, str] | None = None) -> Explanation:
    """Why this VM is, or is not, in the mesh, and what to do about it."""
    out = Explanation(str(key))
    report = AgentReport.from_attributes(agent_report or {})
    if vm is None:
        out.decision = "absent: the VM does not exist"
        out.advice.append(f"check the name and zone (looked for {key})")
        if entry_exists:
            out.advice.append("a WorkloadEntry still exists for it: the next sweep prunes it, or run "
                              f"`meshjoin leave {key.instance} --zone {key.zone}`")
        return out
    status = Status.of(vm)
    out.status = status
    out.facts = {
        "labels": dict(vm.labels), "address": vm.network_ip, "instance id": vm.instance_id,
        "service account": vm.service_account or "(none)",
        "mesh-ports": vm.metadata.get("mesh-ports", "(none)"),
        "WorkloadEntry present": entry_exists,
        "agent report": (report.describe() + (f" (updated {report.updated})" if report.updated else ""))
        if report else "none (guest attributes meshjoin/ are empty)",
    }
    csr = read_csr(agent_report or {}, settings.key_algorithm)
    out.facts["CSR"] = f"valid, key {csr.key_id}" if isinstance(csr, pki.VerifiedCsr) else \
        f"refused: {csr}" if csr is not None else f"none ({CSR_WHERE} is empty)"
    recorded = Delivered.from_status(status)
    if recorded is not None:
        out.facts["certified key"] = f"{recorded.key_id} ({recorded.key_certs} certificate(s) for it)"
        token = rekey_token_of(status)  # validated: the owner's own text is never echoed to an operator's terminal
        if rekey_pending(token, recorded.key_id):
            out.facts["key rotation"] = (f"requested ({names.REKEY_KEY}={token}), waiting for the VM's new "
                                         f"key; the current one serves until then; if nothing comes: {RUN_AGENT_REMEDY}")
    if is_legacy(vm):
        out.facts["legacy per-VM secret"] = f"{vm.metadata.get(names.SECRET_KEY, '')[:200]} (migrating)"
    match course(vm, settings):
        case Leave():
            out.decision = "not requested: the VM has no label mesh=join"
            out.advice.append(f"gcloud compute instances add-labels {key.instance} --zone {key.zone} "
                              "--labels mesh=join")
            return out
        case Deny(denial):
            return _explain_denial(out, denial)
        case Stop(identity) | Join(identity):
            out.decision = f"allowed as {identity.spiffe(settings.trust_domain)}"
    state = status.state
    if state is None:
        out.advice.append(f"no event has been handled for it yet: run `meshjoin join {key.instance}` "
                          "or wait for the next sweep")
    elif state == State.ERROR:
        out.advice.append(f"the last attempt failed: {status.reason}; fix that, then "
                          f"`meshjoin join {key.instance}`")
    elif is_legacy(vm) and state == State.JOINED:
        out.advice.append("migrating: agent 2 still serves from the per-VM secret; agent 3 takes over at the VM's "
                          f"next boot ({RUN_AGENT_REMEDY} to switch now), then meshjoin deletes the secret")
    elif state == State.WAITING and recorded is None:
        out.advice.append("meshjoin waits for the VM's key: nothing is certified until its agent writes a valid CSR "
                          f"to {CSR_WHERE}; it receives no mesh traffic until then")
        if isinstance(csr, pki.CsrError):
            out.advice.append(f"its CSR was refused ({csr}): {RUN_AGENT_REMEDY}, and read `journalctl -t meshjoin`")
        elif csr is None:
            out.advice.append(f"its agent has not handed in a key: {RUN_AGENT_REMEDY}; the agent's log is "
                              "`journalctl -t meshjoin`")
        else:
            out.advice.append("its CSR is valid: the next event or sweep certifies it "
                              f"(`meshjoin join {key.instance}` does it now)")
    elif state == State.WAITING:
        delivered = recorded
        serial = delivered.serial if delivered else "?"
        out.advice.append(f"meshjoin certified the VM's key (certificate {serial}); the VM has not confirmed it, "
                          "so it receives no mesh traffic (no WorkloadEntry yet)")
        if report is None:
            out.advice.append(f"its agent never reported: {RUN_AGENT_REMEDY}")
        elif report.cert_serial != serial:
            out.advice.append(f"its agent reports certificate {report.cert_serial or 'none'}: it has not picked up "
                              f"the delivery; {RUN_AGENT_REMEDY}, and read `journalctl -t meshjoin` on the VM")
        elif report.sidecar != "running":
            out.advice.append(f"its sidecar is {report.sidecar or 'unknown'}: `journalctl -u istio.service` on the VM "
                              "says why")
        else:
            out.advice.append("its agent has confirmed: the next event or sweep makes it joined "
                              f"(`meshjoin join {key.instance}` does it now)")
    elif state == State.JOINED:
        delivered = recorded
        if not entry_exists:
            out.advice.append("its WorkloadEntry is missing: `meshjoin reconcile` (or the next sweep) restores it")
        if delivered is not None:
            left = delivered.not_after - now
            out.facts["certificate time left"] = str(left).split(".")[0] if left.total_seconds() > 0 else "expired"
        if not out.advice:
            out.advice.append("nothing to do: the VM is in the mesh")
    else:
        out.advice.append(f"state {state}: `meshjoin join {key.instance}` re-runs the join")
    return out


def _explain_denial(out: Explanation, denial: Denial) -> Explanation:
    out.decision = f"denied: {denial.reason}"
    if not denial.account_bound:
        out.advice.append("nothing was written to the VM (meshjoin may act only as bound accounts); run it as "
                          "a bound service account, or have an operator bind this one in identity_bindings")
    else:
        out.advice.append("change the VM's mesh-* labels/metadata to an identity its account is bound to, "
                          "or have an operator extend MESHJOIN_IDENTITY_BINDINGS (identity_bindings)")
    return out
