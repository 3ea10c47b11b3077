"""The sweep's pure plan: from listings to actions, table-driven (the prune decision above all)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin import names
from meshjoin.model import Vm, VmKey
from meshjoin.settings import Settings
from meshjoin.sweep import JOIN, PRUNE, PRUNE_SERVICE, REISSUE, RENEW, Inventory, plan_sweep

SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/r/clusters/c", prune_cap=3,
                    allowed_namespaces=("default",))
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
CA = "ca-now"
SPIFFE = "spiffe://cluster.local/ns/default/sa/default"


def key(name: str) -> VmKey:
    return VmKey("my-project", "us-central1-a", name)


def status(name: str, *, issued: datetime = NOW - timedelta(hours=1), ca: str = CA, state: str = "joined",
           instance_id: str = "1", identity: str = SPIFFE) -> str:
    return json.dumps({
        "state": state, "identity": identity, "instanceId": instance_id, "caFingerprint": ca,
        "secret": f"projects/1/secrets/meshjoin-vm-us-central1-a-{name}/versions/1",
        "certNotBefore": issued.isoformat(), "certNotAfter": (issued + timedelta(hours=24)).isoformat(),
        "workloadEntry": f"default/{name}-us-central1-a"})


def vm(name: str, raw_status: str | None = None, labels: dict | None = None) -> Vm:
    metadata = {names.STATUS_KEY: raw_status} if raw_status is not None else {}
    return Vm(key(name), "1", {"mesh": "join", **(labels or {})}, metadata, "fp", "10.0.0.2", f"{name}@x")


def entry(name: str, namespace: str = "default", app: str | None = None) -> dict:
    return {"metadata": {"name": f"{name}-us-central1-a", "namespace": namespace,
                         "labels": {"app": app or name, names.MANAGED_BY_LABEL: "meshjoin"},
                         "annotations": {"meshjoin.dev/project": "my-project", "meshjoin.dev/zone": "us-central1-a",
                                         "meshjoin.dev/instance": name}}}


def service(name: str, namespace: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "labels": {names.MANAGED_BY_LABEL: "meshjoin"}}}


def inventory(vms=(), entries=(), services=(), secrets=(), errors=()) -> Inventory:
    return Inventory({v.key: v for v in vms}, list(entries), list(services),
                     {key(n): f"projects/1/secrets/meshjoin-vm-us-central1-a-{n}" for n in secrets}, list(errors))


def kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.key.instance if a.key else a.target) for a in plan.actions]


@pytest.mark.parametrize("inv, expected", [
    pytest.param(inventory([vm("a", status("a"))], [entry("a")], [], ["a"]), [], id="healthy: nothing to do"),
    pytest.param(inventory([vm("a")], [], [], []), [(JOIN, "a")], id="missed join (no status)"),
    pytest.param(inventory([vm("a", status("a", state="error"))], [], [], ["a"]), [(JOIN, "a")],
                 id="earlier error retried"),
    pytest.param(inventory([vm("a", status("a"))], [], [], ["a"]), [(JOIN, "a")], id="entry missing: repaired"),
    pytest.param(inventory([vm("a", status("a", issued=NOW - timedelta(hours=13)))], [entry("a")], [], ["a"]),
                 [(RENEW, "a")], id="past renewal point"),
    pytest.param(inventory([vm("a", status("a", ca="ca-old"))], [entry("a")], [], ["a"]), [(REISSUE, "a")],
                 id="CA rotated"),
    pytest.param(inventory([vm("a", status("a"), {"mesh-namespace": "istio-system"})], [], [], []),
                 [(JOIN, "a")], id="now denied by policy: reconcile records it"),
    pytest.param(inventory([], [entry("gone")], [], ["gone"]), [(PRUNE, "gone")], id="VM gone: one prune per key"),
    pytest.param(inventory([], [], [], ["gone"]), [(PRUNE, "gone")], id="secret without VM or entry"),
    pytest.param(inventory([], [], [service("lonely")], []), [(PRUNE_SERVICE, "default/lonely")],
                 id="Service nothing selects"),
    pytest.param(inventory([vm("a", status("a"))], [entry("a", app="shop")], [service("shop")], ["a"]), [],
                 id="Service still selected"),
])
def test_plan(inv, expected):
    assert kinds(plan_sweep(inv, SETTINGS, CA, NOW)) == expected


def test_incomplete_listing_prunes_nothing():
    inv = inventory([], [entry("gone")], [service("lonely")], ["gone"], errors=["WorkloadEntries: 503"])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert plan.actions == []
    assert any("nothing pruned" in note for note in plan.notes)


def test_prune_cap():
    inv = inventory([], [entry(f"g{i}") for i in range(5)], [], [])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert [k for k, _ in kinds(plan)] == [PRUNE] * 3
    assert plan.prune_candidates == 5
    assert any("exceed MESHJOIN_PRUNE_CAP=3" in note for note in plan.notes)


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
    denied_status = json.dumps({"state": "denied", "reason": "namespace 'istio-system' is reserved for the "
                                "platform; only an explicit entry in MESHJOIN_ALLOWED_NAMESPACES allows it"})
    inv = inventory([vm("a", denied_status, {"mesh-namespace": "istio-system"})], [], [], [])
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert plan.actions == [] and plan.denied == 1
