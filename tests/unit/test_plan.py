"""The plan for one VM, facts in, steps out (plan.py): no fake, no I/O, one row a scenario.

A row gives the VM (its labels, run state, metadata with the status an earlier pass wrote), what its agent
said this pass (report, CSR), the CA and `force`. `plan_join` answers the steps; when a certificate is due it
stops at Certify, and the test plans again with a certificate as the executor would (`issued`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin import names, pki
from meshjoin.model import Vm, VmKey
from meshjoin.plan import (AgentReport, AgentWords, Cause, Certify, CheckEntryName, DeleteLegacySecret, Deny, Join,
                           JoinFacts, Leave, LogWarning, Register, Stop, Verb, Withdraw, WriteMetadata, course,
                           labelled_course, plan_join, reads_agent)
from meshjoin.settings import IdentityBinding, Settings
from meshjoin.status import State, Status, rfc3339, written

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
KEY = VmKey("my-project", "us-central1-a", "vm-1")
ACCOUNT = "vm-1@my-project.iam.gserviceaccount.com"
SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/us-central1/clusters/mesh",
                    identity_bindings=(IdentityBinding(ACCOUNT, "default", "default", ("vm-1",)),),
                    cert_ttl=timedelta(hours=24))
SPIFFE = "spiffe://cluster.local/ns/default/sa/default"
OLD_SPIFFE = "spiffe://cluster.local/ns/apps/sa/web"
ENTRY = f"default/{names.entry_name(KEY)}"
OLD_ENTRY = f"apps/{names.entry_name(KEY)}"
KEY_A, KEY_B = "a" * 16, "b" * 16
CA, OLD_CA = "ca-now", "ca-before"
INSTANCE, OTHER_INSTANCE = "4242", "1111"
HOUR = timedelta(hours=1)


def status(state: State, *, identity: str = SPIFFE, instance: str = INSTANCE, cert: bool = True,
           issued: datetime = NOW - HOUR, ca: str = CA, confirmed: bool = True, entry: str | None = ENTRY,
           **extra) -> str:
    """A status as a pass of meshjoin wrote it (certificate 1f for KEY_A, unless `cert` is False)."""
    certificate = dict(ca_fingerprint=ca, cert_not_before=rfc3339(issued), cert_not_after=rfc3339(issued + 24 * HOUR),
                       cert_serial="1f", key_id=KEY_A, key_certs="1") if cert else {}
    extra.setdefault("confirmed_serial", "1f" if confirmed and state == State.JOINED else None)
    return written(state, "earlier", NOW - 2 * HOUR, identity=identity, instance_id=instance,
                   workload_entry=entry if state == State.JOINED else None, address="10.128.0.7",
                   **certificate | extra).encode()


def vm(raw_status: str | None = None, *, labels: dict | None = None, run: str = "RUNNING", **metadata) -> Vm:
    items = {names.STATUS_KEY: raw_status} if raw_status is not None else {}
    return Vm(KEY, INSTANCE, {"mesh": "join"} if labels is None else labels, {**items, **metadata}, "fp",
              "10.128.0.7", ACCOUNT, run)


def said(serial: str | None = None, csr_key: str | None = None, sidecar: str = "running") -> AgentWords:
    report = AgentReport("3", serial, sidecar) if serial else None
    return AgentWords(report, pki.VerifiedCsr(public_key=None, key_id=csr_key) if csr_key else None)


def issued_for(step: Certify) -> pki.IssuedCert:
    """What the executor's pki.certify answers for the step: the plan reads only these fields."""
    return pki.IssuedCert("LEAF", "CHAIN", "ROOT", NOW - timedelta(minutes=5), NOW + 24 * HOUR, 0x2a, step.spiffe,
                          step.csr.key_id)


def facts(machine: Vm, agent: AgentWords | None, *, ca: str = CA, force: bool = False) -> JoinFacts:
    identity = labelled_course(machine, SETTINGS).identity
    return JoinFacts(machine, identity, Status.decode(machine.metadata.get(names.STATUS_KEY)), ca, "ROOT", NOW,
                     SETTINGS, force, agent=agent)


def shape(step) -> str:
    match step:
        case CheckEntryName():
            return "check entry name"
        case Certify(csr, _, why):
            return f"certify {csr.key_id[:1]} ({why.name})"
        case Register(_, previous):
            return f"register (was {previous})"
        case Withdraw(entry):
            return f"withdraw {entry}"
        case LogWarning():
            return "warn"
        case WriteMetadata(_, _, state):
            return f"write {state}"
        case DeleteLegacySecret():
            return "delete legacy secret"


def run(given: JoinFacts) -> tuple[list[str], list[str], tuple, JoinFacts]:
    """Both stages of a pass: the steps up to Certify (empty when nothing is signed), then the rest."""
    first = plan_join(given)
    before: list[str] = []
    if first.certify is not None:
        assert first.steps[-1] == first.certify and first.state is None  # Certify ends the first stage
        before = [shape(s) for s in first.steps]
        given = replace(given, issued=issued_for(first.certify))
        first = plan_join(given)
    assert first.certify is None
    return before, [shape(s) for s in first.steps], (first.state, first.verb_if_written, first.verb_if_not), given


WAITING, JOINED = State.WAITING, State.JOINED
W = "write"

SCENARIOS = [
    pytest.param(vm(), said(), [], ["check entry name", "withdraw None", f"{W} waiting"],
                 (WAITING, Verb.BOOTSTRAPPED, Verb.RECHECKED), id="first delivery, no key yet: bootstrap"),
    pytest.param(vm(status(WAITING, cert=False)), said(csr_key=KEY_A), ["certify a (NO_CERT)"],
                 ["withdraw None", f"{W} waiting"], (WAITING, Verb.DELIVERED, Verb.DELIVERED),
                 id="first delivery, CSR handed in: the bootstrap pass checked the entry name"),
    pytest.param(vm(), said(csr_key=KEY_A), ["check entry name", "certify a (NO_CERT)"],
                 ["withdraw None", f"{W} waiting"], (WAITING, Verb.DELIVERED, Verb.DELIVERED),
                 id="first delivery, no status: the entry name is checked before signing"),
    pytest.param(vm(status(WAITING)), said("1f", KEY_A), [], ["register (was None)", f"{W} joined"],
                 (JOINED, Verb.REGISTERED, Verb.REGISTERED), id="confirmed: registered"),
    pytest.param(vm(status(WAITING)), said("1f", KEY_A, sidecar="failed"), [], ["withdraw None", f"{W} waiting"],
                 (WAITING, Verb.RECHECKED, Verb.RECHECKED), id="installed but the sidecar failed: still waiting"),
    pytest.param(vm(status(JOINED)), said("1f", KEY_A), [], [f"register (was {ENTRY})", f"{W} joined"],
                 (JOINED, Verb.REFRESHED, Verb.UNCHANGED), id="joined, nothing due"),
    pytest.param(vm(status(JOINED)), None, [], [f"register (was {ENTRY})", f"{W} joined"],
                 (JOINED, Verb.REFRESHED, Verb.UNCHANGED), id="joined, agent not read (the sweep)"),
    pytest.param(vm(status(JOINED, issued=NOW - 20 * HOUR)), said("1f", KEY_A), ["certify a (RENEWAL_DUE)"],
                 [f"register (was {ENTRY})", f"{W} joined"], (JOINED, Verb.RENEWED, Verb.RENEWED),
                 id="renewal due: the same key, no entry-name check"),
    pytest.param(vm(status(JOINED, issued=NOW - 20 * HOUR)), said("1f"), [],
                 [f"register (was {ENTRY})", "warn", f"{W} joined"], (JOINED, Verb.REFRESHED, Verb.UNCHANGED),
                 id="renewal due, no CSR: nothing signed, a warning"),
    pytest.param(vm(status(JOINED, ca=OLD_CA)), said("1f", KEY_A), ["certify a (CA_CHANGED)"],
                 [f"register (was {ENTRY})", f"{W} joined"], (JOINED, Verb.REISSUED, Verb.REISSUED),
                 id="CA changed: re-issued"),
    pytest.param(vm(status(JOINED)), said("1f", KEY_B), ["certify b (NEW_KEY)"],
                 [f"register (was {ENTRY})", f"{W} joined"], (JOINED, Verb.ROTATED, Verb.ROTATED),
                 id="new key: rotated, still joined"),
    pytest.param(vm(status(JOINED)), said("1f", KEY_A), ["certify a (FORCED)"],
                 [f"register (was {ENTRY})", f"{W} joined"], (JOINED, Verb.RENEWED, Verb.RENEWED),
                 id="forced"),
    pytest.param(vm(status(JOINED, instance=OTHER_INSTANCE)), said("1f", KEY_A), [],
                 ["check entry name", f"withdraw {ENTRY}", f"{W} waiting"],
                 (WAITING, Verb.BOOTSTRAPPED, Verb.RECHECKED),
                 id="recreated copy presenting the original's key: refused, starts over"),
    pytest.param(vm(status(JOINED, instance=OTHER_INSTANCE)), said(csr_key=KEY_B),
                 ["check entry name", "certify b (RECREATED)"], [f"withdraw {ENTRY}", f"{W} waiting"],
                 (WAITING, Verb.DELIVERED, Verb.DELIVERED), id="recreated copy with a key of its own"),
    pytest.param(vm(status(JOINED, identity=OLD_SPIFFE, entry=OLD_ENTRY)), said("1f", KEY_A),
                 ["check entry name", "certify a (IDENTITY_CHANGED)"], [f"withdraw {OLD_ENTRY}", f"{W} waiting"],
                 (WAITING, Verb.DELIVERED, Verb.DELIVERED), id="identity changed: confirms afresh"),
    # As in 096ecd2: the entry-name check looks at the certificate recorded before the identity changed, so
    # none is made here (the registration itself never replaces an entry meshjoin did not make).
    pytest.param(vm(status(JOINED, identity=OLD_SPIFFE, entry=OLD_ENTRY)), said("1f"), [],
                 [f"withdraw {OLD_ENTRY}", f"{W} waiting"],
                 (WAITING, Verb.BOOTSTRAPPED, Verb.RECHECKED), id="identity changed, no CSR"),
]


@pytest.mark.parametrize("machine, agent, before, after, outcome", SCENARIOS)
def test_plan_for_one_vm(machine, agent, before, after, outcome, request):
    force = request.node.callspec.id == "forced"  # the one row an operator's --force drives
    got = run(facts(machine, agent, force=force))
    assert (got[0], got[1], got[2]) == (before, after, outcome)


def test_what_a_first_delivery_writes():
    _, _, _, given = run(facts(vm(status(WAITING, cert=False)), said(csr_key=KEY_A)))
    write = plan_join(given).write
    assert write.items[names.CERT_CHAIN_KEY] == "CHAIN" and write.items[names.ROOT_CERT_KEY] == "ROOT"
    assert write.fields["key_id"] == KEY_A and write.fields["cert_serial"] == "2a"
    assert write.fields["key_certs"] == "1" and write.fields["confirmed_serial"] is None
    assert write.fields["waiting_since"] == rfc3339(NOW)  # a new certificate: the wait starts now
    assert "waiting for the VM to confirm" in write.reason and names.STARTUP_SCRIPT_KEY in write.items


def test_a_renewal_keeps_the_confirmation_and_counts_the_key_s_certificates():
    _, _, _, given = run(facts(vm(status(JOINED, issued=NOW - 20 * HOUR)), said("1f", KEY_A)))
    planned = plan_join(given)
    assert planned.write.fields["confirmed_serial"] == "1f" and planned.write.fields["cert_serial"] == "2a"
    assert planned.write.fields["key_certs"] == "2" and planned.write.fields["rekey"] is None
    assert planned.reason == f"joined ({Cause.RENEWAL_DUE})"


def test_identity_change_asks_for_a_new_key():
    _, _, _, given = run(facts(vm(status(JOINED, identity=OLD_SPIFFE, entry=OLD_ENTRY)), said("1f", KEY_A)))
    write = plan_join(given).write
    assert write.items[names.REKEY_KEY].startswith(KEY_A + ".") and write.fields["rekey"] == write.items[names.REKEY_KEY]


def test_a_recreated_copy_loses_the_original_s_certificate_and_rotation_request():
    write = plan_join(facts(vm(status(JOINED, instance=OTHER_INSTANCE)), said("1f", KEY_A))).write
    assert {names.CERT_CHAIN_KEY, names.REKEY_KEY} <= write.remove and write.fields["key_id"] is None
    assert "copied from" in write.reason


LEGACY_SECRET = "projects/1/secrets/meshjoin-vm-x/versions/3"


LEGACY_NOT_AFTER = "2026-11-22T00:00:00Z"  # agent 2's certificate, recorded by meshjoin 2


def legacy_vm(raw_status: str) -> Vm:
    return vm(raw_status, **{names.SECRET_KEY: LEGACY_SECRET, names.STARTUP_SCRIPT_KEY: names.STARTUP_SCRIPT_MARKER})


@pytest.mark.parametrize("machine, agent, before, after, outcome", [
    pytest.param(legacy_vm(status(JOINED, cert=False, confirmed_serial="abc", cert_not_after=LEGACY_NOT_AFTER)),
                 said("abc"), [], ["check entry name", f"register (was {ENTRY})", f"{W} joined"],
                 (JOINED, Verb.MIGRATING, Verb.UNCHANGED), id="legacy: agent 2 serves until agent 3 boots"),
    pytest.param(legacy_vm(status(JOINED, cert=False, confirmed_serial="abc", cert_not_after=LEGACY_NOT_AFTER)),
                 said("abc", KEY_A), ["check entry name", "certify a (NO_CERT)"],
                 [f"register (was {ENTRY})", f"{W} joined"],
                 (JOINED, Verb.DELIVERED, Verb.DELIVERED), id="legacy: agent 3 handed in its key"),
    pytest.param(legacy_vm(status(JOINED, confirmed_serial="abc")), said("1f", KEY_A), [],
                 [f"register (was {ENTRY})", f"{W} joined", "delete legacy secret"],
                 (JOINED, Verb.MIGRATED, Verb.MIGRATED), id="legacy: agent 3 confirmed, the secret goes"),
])
def test_plan_of_a_legacy_migration(machine, agent, before, after, outcome):
    got = run(facts(machine, agent))
    assert (got[0], got[1], got[2]) == (before, after, outcome)


def test_legacy_items_before_agent_3_are_only_what_agent_3_needs_first():
    raw = status(JOINED, cert=False, confirmed_serial="abc", cert_not_after=LEGACY_NOT_AFTER)
    planned = plan_join(facts(legacy_vm(raw), said("abc")))
    write, register = planned.write, next(s for s in planned.steps if isinstance(s, Register))
    assert set(write.items) <= {names.STARTUP_SCRIPT_KEY, names.KEY_ALGORITHM_KEY, names.GUEST_ATTRIBUTES_KEY}
    assert names.SECRET_KEY not in write.remove and write.fields["cert_not_after"] == LEGACY_NOT_AFTER
    assert rfc3339(register.not_after) == LEGACY_NOT_AFTER  # the entry keeps agent 2's certificate's end
    migrated = plan_join(facts(legacy_vm(status(JOINED, confirmed_serial="abc")), said("1f", KEY_A))).write
    assert names.SECRET_KEY in migrated.remove


@pytest.mark.parametrize("machine, expected", [
    pytest.param(vm(status(JOINED), labels={}), Leave(), id="label removed"),
    pytest.param(vm(status(JOINED), labels={"mesh": "join", "mesh-namespace": "istio-system"}), Deny, id="denied"),
    pytest.param(vm(status(JOINED), run="TERMINATED"), Stop, id="stopped"),
    pytest.param(vm(status(JOINED), run="SUSPENDED"), Stop, id="suspended"),
    pytest.param(vm(status(JOINED)), Join, id="running and allowed"),
])
def test_course(machine, expected):
    got = course(machine, SETTINGS)
    assert got == expected if isinstance(expected, Leave) else type(got) is expected
    if isinstance(got, (Stop, Join)):
        assert got.identity.spiffe(SETTINGS.trust_domain) == SPIFFE
    if isinstance(got, Deny):
        assert "istio-system" in got.denial.reason


@pytest.mark.parametrize("machine, always, expected", [
    pytest.param(vm(), True, False, id="never bootstrapped: nothing to read yet"),
    pytest.param(vm(status(JOINED)), True, True, id="an event always reads"),
    pytest.param(vm(status(JOINED)), False, False, id="sweep, confirmed, nothing due: no read"),
    pytest.param(vm(status(WAITING)), False, True, id="sweep, waiting"),
    pytest.param(vm(status(JOINED, issued=NOW - 20 * HOUR)), False, True, id="sweep, renewal due"),
    pytest.param(vm(status(JOINED, rekey=f"{KEY_A}.20261121T000000Z")), False, True, id="sweep, rotation pending"),
    pytest.param(legacy_vm(status(JOINED, cert=False, confirmed_serial="abc")), False, True, id="sweep, legacy"),
    pytest.param(vm(status(JOINED, instance=OTHER_INSTANCE)), False, True, id="sweep, a copied status"),
])
def test_when_the_agent_is_read(machine, always, expected):
    assert reads_agent(facts(machine, None), always) is expected


def test_a_certificate_the_plan_did_not_ask_for_is_refused():
    given = replace(facts(vm(status(JOINED)), said("1f", KEY_A)),
                    issued=issued_for(Certify(pki.VerifiedCsr(None, KEY_A), SPIFFE, Cause.FORCED)))
    with pytest.raises(ValueError):
        plan_join(given)


def test_the_entry_the_status_names_is_the_one_registration_makes():
    from meshjoin import registration

    given = facts(vm(status(WAITING)), said("1f", KEY_A))
    meta = registration.workload_entry(given.vm, given.identity, SETTINGS.network, NOW)["metadata"]
    assert plan_join(given).write.fields["workload_entry"] == f"{meta['namespace']}/{meta['name']}" == ENTRY
