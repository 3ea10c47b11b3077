"""The sweep's pure plan: from listings to actions, table-driven (the prune decision above all)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin import names
from meshjoin.model import Vm, VmKey
from meshjoin.policy import decide_identity
from meshjoin.settings import IdentityBinding, Settings
from meshjoin.sweep import JOIN, PRUNE, PRUNE_SERVICE, REISSUE, RENEW, Inventory, plan_sweep

BOUND = ("a", "early", "late", "new", "rot")  # each VM runs as its own account, bound to default/default
SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/r/clusters/c", prune_cap=3,
                    identity_bindings=tuple(IdentityBinding(f"{n}@x", "default", "default", (n,)) for n in BOUND))
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
CA = "ca-now"
SPIFFE = "spiffe://cluster.local/ns/default/sa/default"


def key(name: str) -> VmKey:
    return VmKey("my-project", "us-central1-a", name)


KEY_ID = "0123456789abcdef"


def status(name: str, *, issued: datetime = NOW - timedelta(hours=1), ca: str = CA, state: str = "joined",
           instance_id: str = "1", identity: str = SPIFFE, rekey: str | None = None) -> str:
    return json.dumps({
        "state": state, "identity": identity, "instanceId": instance_id, "caFingerprint": ca,
        "keyId": KEY_ID, "keyCerts": "1", "certSerial": "1f", **({"rekey": rekey} if rekey else {}),
        "certNotBefore": issued.isoformat(), "certNotAfter": (issued + timedelta(hours=24)).isoformat(),
        "workloadEntry": f"default/{name}-us-central1-a-my-project",
        **({"waitingSince": issued.isoformat()} if state == "waiting" else {})})


def vm(name: str, raw_status: str | None = None, labels: dict | None = None, *, address: str = "10.0.0.2",
       metadata: dict | None = None, state: str = "RUNNING") -> Vm:
    metadata = {**(metadata or {}), **({names.STATUS_KEY: raw_status} if raw_status is not None else {})}
    return Vm(key(name), "1", {"mesh": "join", **(labels or {})}, metadata, "fp", address, f"{name}@x", state)


def entry(name: str, namespace: str = "default", app: str | None = None, project: str = "my-project",
          ports: dict | None = None) -> dict:
    return {"spec": {"address": "10.0.0.2", **({"ports": ports} if ports else {})}, "metadata": {"name": f"{name}-us-central1-a-{project}", "namespace": namespace,
                         "labels": {"app": app or name, names.MANAGED_BY_LABEL: "meshjoin"},
                         "annotations": {"meshjoin.dev/project": project, "meshjoin.dev/zone": "us-central1-a",
                                         "meshjoin.dev/instance": name}}}


def service(name: str, namespace: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "labels": {names.MANAGED_BY_LABEL: "meshjoin"}}}


def inventory(vms=(), entries=(), services=(), secrets=(), errors=()) -> Inventory:
    return Inventory({v.key: v for v in vms}, list(entries), list(services),
                     {key(n): f"projects/1/secrets/meshjoin-vm-my-project-us-central1-a-{n}" for n in secrets}, list(errors))


def kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.key.instance if a.key else a.target) for a in plan.actions]


@pytest.mark.parametrize("inv, expected", [
    pytest.param(inventory([vm("a", status("a"))], [entry("a")], [], []), [], id="healthy: nothing to do"),
    pytest.param(inventory([vm("a")], [], [], []), [(JOIN, "a")], id="missed join (no status)"),
    pytest.param(inventory([vm("a", status("a", state="error"))], [], [], []), [(JOIN, "a")],
                 id="earlier error retried"),
    pytest.param(inventory([vm("a", status("a"))], [], [], []), [(JOIN, "a")], id="entry missing: repaired"),
    pytest.param(inventory([vm("a", status("a", issued=NOW - timedelta(hours=13)))], [entry("a")], [], []),
                 [(RENEW, "a")], id="past renewal point"),
    pytest.param(inventory([vm("a", status("a", ca="ca-old"))], [entry("a")], [], []), [(REISSUE, "a")],
                 id="CA rotated"),
    pytest.param(inventory([vm("a", status("a"), {"mesh-namespace": "istio-system"})], [], [], []),
                 [(JOIN, "a")], id="now denied by policy: reconcile records it"),
    pytest.param(inventory([], [entry("gone")], [], ["gone"]), [(PRUNE, "gone")], id="VM gone: one prune per key"),
    pytest.param(inventory([], [], [], ["gone"]), [(PRUNE, "gone")], id="secret without VM or entry"),
    pytest.param(inventory([], [], [service("lonely")], []), [(PRUNE_SERVICE, "default/lonely")],
                 id="Service nothing selects"),
    pytest.param(inventory([vm("a", status("a"))], [entry("a", app="shop")], [service("shop")], []), [],
                 id="Service still selected"),
])
def test_plan(inv, expected):
    assert kinds(plan_sweep(inv, SETTINGS, CA, NOW)) == expected


def test_incomplete_listing_prunes_nothing():
    inv = inventory([], [entry("gone")], [service("lonely")], ["gone"], errors=["WorkloadEntries: 503"])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert plan.actions == []
    assert [(note.severity, note.outcome) for note in plan.notes if "nothing pruned" in note] == [("ERROR", "deferred")]


def test_prune_cap():
    inv = inventory([], [entry(f"g{i}") for i in range(5)], [], [])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert [k for k, _ in kinds(plan)] == [PRUNE] * 3
    assert plan.prune_candidates == 5
    assert [note.severity for note in plan.notes if "exceed MESHJOIN_PRUNE_CAP=3" in note] == ["ERROR"]


def test_joins_first_then_reissues_then_renewals_earliest_due_first():
    inv = inventory([
        vm("late", status("late", issued=NOW - timedelta(hours=13))),
        vm("early", status("early", issued=NOW - timedelta(hours=20))),
        vm("rot", status("rot", ca="ca-old")),
        vm("new"),
    ], [entry(n) for n in ("late", "early", "rot")], [], [])
    assert kinds(plan_sweep(inv, SETTINGS, CA, NOW)) == [(JOIN, "new"), (REISSUE, "rot"), (RENEW, "early"),
                                                         (RENEW, "late")]


def test_denied_vms_are_counted_not_rewritten():
    reason = decide_identity(vm("a", labels={"mesh-namespace": "istio-system"}), SETTINGS).reason
    denied_status = json.dumps({"state": "denied", "reason": reason})
    inv = inventory([vm("a", denied_status, {"mesh-namespace": "istio-system"})], [], [], [])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert plan.actions == [] and plan.denied == 1


@pytest.mark.parametrize("inv, expected", [
    pytest.param(inventory([vm("a", status("a"), address="10.0.0.3")], [entry("a")], [], []), [(JOIN, "a")],
                 id="address changed: the entry follows"),
    pytest.param(inventory([vm("a", status("a"), metadata={"mesh-ports": "http:8080"})], [entry("a")], [], []),
                 [(JOIN, "a")], id="ports changed: the entry and Service follow"),
    pytest.param(inventory([vm("a", status("a"), metadata={"mesh-ports": "http:8080"})],
                           [entry("a", ports={"http": 8080})], [], []), [], id="ports unchanged"),
    pytest.param(inventory([vm("a", status("a"), state="TERMINATED")], [entry("a")], [], []), [(JOIN, "a")],
                 id="stopped but still routed: unroute"),
    pytest.param(inventory([vm("a", json.dumps({"state": "stopped"}), state="TERMINATED")], [], [], []), [],
                 id="stopped and unrouted: nothing, no renewal"),
    pytest.param(inventory([vm("stranger")], [], [], []), [], id="unbound account without traces: nothing to write"),
    pytest.param(inventory([vm("stranger")], [entry("stranger")], [], []), [(JOIN, "stranger")],
                 id="unbound account with an entry: its registration goes"),
    pytest.param(inventory([], [entry("gone", project="other-project")], [], []), [],
                 id="forged entry naming another project: dropped, never pruned through"),
])
def test_plan_stale_state_and_foreign_keys(inv, expected):
    assert kinds(plan_sweep(inv, SETTINGS, CA, NOW)) == expected


WAITING = "waiting for the VM to confirm"
LEGACY = {names.SECRET_KEY: "projects/1/secrets/meshjoin-vm-my-project-us-central1-a-a/versions/3"}


@pytest.mark.parametrize("inv, expected", [
    pytest.param(inventory([vm("a", status("a", rekey=KEY_ID + ".20261121T000000Z"))], [entry("a")], [], []),
                 [(JOIN, "a", "a key rotation was requested")], id="rotation pending: look for the new key"),
    pytest.param(inventory([vm("a", status("a", rekey="fedcba9876543210.20261101T000000Z"))], [entry("a")], [], []),
                 [], id="an old token (the key has rotated since): nothing"),
    pytest.param(inventory([vm("a", status("a", rekey=KEY_ID + ".x\ny"))], [entry("a")], [], []),
                 [], id="a token meshjoin never writes (the owner's): nothing, as the reconcile reads it"),
    pytest.param(inventory([vm("a", json.dumps({"state": "waiting", "identity": SPIFFE, "instanceId": "1"}))],
                           [], [], []), [(JOIN, "a", "waiting for the VM to hand in its key")],
                 id="waiting for the first CSR: re-checked"),
    pytest.param(inventory([vm("a", status("a"), metadata=LEGACY)], [entry("a")], [], ["a"]),
                 [(JOIN, "a", "migrating from its per-VM secret")], id="legacy VM: migration checked, secret kept"),
    pytest.param(inventory([vm("a", status("a"))], [entry("a")], [], ["a"]),
                 [("prune-secret", "a", "legacy per-VM secret of a VM that no longer uses one")],
                 id="migrated VM whose secret is left: pruned"),
    pytest.param(inventory([vm("stranger", json.dumps({"state": "denied", "reason": "forged"}))], [], [],
                           ["stranger"]), [(JOIN, "stranger", "to be denied")],
                 id="a denial removes the legacy secret itself: no second prune"),
])
def test_plan_follows_keys_rotations_and_legacy_secrets(inv, expected):
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert [(a.kind, a.key.instance, a.reason[:len(why)]) for a, (_, _, why) in zip(plan.actions, expected)] \
        == expected and len(plan.actions) == len(expected)


@pytest.mark.parametrize("inv, expected", [
    pytest.param(inventory([vm("a", status("a", state="waiting"))], [], [], []), [(JOIN, "a", WAITING)],
                 id="waiting: re-checked"),
    pytest.param(inventory([vm("a", status("a", state="waiting"), address="10.0.0.3",
                               metadata={"mesh-ports": "http:8080"})], [], [], []), [(JOIN, "a", WAITING)],
                 id="waiting with drifted address and ports: re-checked, the status follows"),
    pytest.param(inventory([vm("a", status("a", state="waiting"), state="TERMINATED")], [], [], []),
                 [(JOIN, "a", "the VM is TERMINATED: to be taken out of routing")],
                 id="waiting but stopped: marked stopped, never re-checked for confirmation"),
    pytest.param(inventory([vm("a", status("a", state="waiting"), {"mesh-namespace": "istio-system"})], [], [],
                           []), [(JOIN, "a", "to be denied")], id="waiting but now denied by policy"),
    pytest.param(inventory([vm("stranger", status("stranger", state="waiting"))], [], [], ["stranger"]),
                 [(JOIN, "stranger", "to be denied")], id="waiting on an account unbound since, with a legacy secret: it goes"),
    pytest.param(inventory([vm("stranger", json.dumps({"state": "denied", "reason": "forged"}))], [], [],
                           ["stranger"]), [(JOIN, "stranger", "to be denied")],
                 id="unbound, a forged 'denied' status and a legacy secret: the secret still goes"),
])
def test_plan_of_waiting_vms_honours_stops_denials_and_drift(inv, expected):
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert [(a.kind, a.key.instance, a.reason[:len(why)]) for a, (_, _, why) in zip(plan.actions, expected)] \
        == expected and len(plan.actions) == len(expected)


def test_one_vm_that_breaks_planning_costs_only_that_vm(monkeypatch):
    """Blast radius: a bug one VM's data triggers in planning leaves every other VM's plan intact."""
    import meshjoin.sweep as sweep

    real = sweep.labelled_course

    def fragile(vm, settings):
        if vm.key.instance == "a":
            raise ValueError("invalid literal for int() with base 10: '²'")
        return real(vm, settings)

    monkeypatch.setattr(sweep, "labelled_course", fragile)
    plan = plan_sweep(inventory([vm("a"), vm("new")], [], [], []), SETTINGS, CA, NOW)
    assert kinds(plan) == [(JOIN, "new")]
    assert any("us-central1-a/a: not planned (ValueError" in note for note in plan.notes)
