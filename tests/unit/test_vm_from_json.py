"""meshjoin reads Compute as plain JSON (listings and single VMs): `vm_from_json` must see what the SDK's
type holds, read field by field as meshjoin read it when it used the SDK (`sdk_vm`); and the sweep's slim
view (only the metadata items the planner reads) must plan exactly as the whole VM."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from google.cloud import compute_v1

from meshjoin import names
from meshjoin.adapters.compute import SHARED_VALUE_BYTES, SWEEP_METADATA_KEYS, ComputeAdapter, vm_from_json
from meshjoin.fleet import fleet_rows
from meshjoin.model import Vm, VmKey
from meshjoin.sweep import plan_sweep, planning_entry, soonest_cert_expiry

from meshjoin.settings import IdentityBinding

from .test_sweep_plan import CA, NOW, SETTINGS, entry, inventory, status, vm

KEY = VmKey("p", "us-central1-a", "vm-1")
SCRIPT = "#!/bin/bash\n" + "x" * SHARED_VALUE_BYTES


def sdk_vm(key: VmKey, instance: compute_v1.Instance) -> Vm:
    """The reference: a `Vm` from google-cloud-compute's `Instance`."""
    interfaces = list(instance.network_interfaces)
    accounts = list(instance.service_accounts)
    return Vm(key=key, instance_id=str(instance.id), labels=dict(instance.labels),
              metadata={item.key: item.value for item in instance.metadata.items},
              metadata_fingerprint=instance.metadata.fingerprint,
              network_ip=interfaces[0].network_i_p if interfaces else "",
              service_account=accounts[0].email if accounts else None, status=instance.status)


def instance(**fields) -> compute_v1.Instance:
    return compute_v1.Instance(name="vm-1", **fields)


CASES = {
    "joined VM": instance(
        id=1234567890123456789, status="RUNNING", labels={"mesh": "join", "mesh-namespace": "apps"},
        metadata=compute_v1.Metadata(fingerprint="abc=", items=[
            compute_v1.Items(key="startup-script", value=SCRIPT), compute_v1.Items(key="meshjoin-status", value="{}"),
            compute_v1.Items(key="empty", value="")]),
        network_interfaces=[compute_v1.NetworkInterface(network_i_p="10.128.0.7")],
        service_accounts=[compute_v1.ServiceAccount(email="vm-1@p.iam.gserviceaccount.com")]),
    "bare VM": instance(id=7, status="STAGING", metadata=compute_v1.Metadata(fingerprint="f")),
}


@pytest.mark.parametrize("case", CASES)
def test_json_listing_reads_the_same_vm_as_the_sdk(case):
    proto = CASES[case]
    wire = json.loads(compute_v1.Instance.to_json(proto))  # the REST API's JSON (lowerCamel, int64 as strings)
    assert vm_from_json(KEY, wire) == sdk_vm(KEY, proto)


def test_large_values_repeated_across_vms_are_kept_once():
    shared: dict[str, str] = {}
    wire = json.loads(compute_v1.Instance.to_json(CASES["joined VM"]))
    first, second = vm_from_json(KEY, json.loads(json.dumps(wire)), shared), vm_from_json(KEY, wire, shared)
    assert first.metadata["startup-script"] is second.metadata["startup-script"]
    # Labels, the account and the status repeat across a fleet: one string each per listing.
    assert first.labels["mesh-namespace"] is second.labels["mesh-namespace"]
    assert first.service_account is second.service_account and first.status is second.status
    assert "{}" not in shared  # small metadata values (each VM's own status) are not collected


def as_json(v: Vm) -> dict:
    """A Vm as the REST API would list it."""
    return {"name": v.key.instance, "id": v.instance_id, "status": v.status, "labels": dict(v.labels),
            "metadata": {"fingerprint": v.metadata_fingerprint,
                         "items": [{"key": k, "value": value} for k, value in v.metadata.items()]},
            "networkInterfaces": [{"networkIP": v.network_ip}],
            "serviceAccounts": [{"email": v.service_account}] if v.service_account else []}


BULKY = {"startup-script": "#!/bin/bash\n" + "x" * 2000, names.CERT_CHAIN_KEY: "-----BEGIN CERTIFICATE-----\n...",
         names.CLUSTER_ENV_KEY: "ISTIO_NAMESPACE=default", "enable-guest-attributes": "TRUE"}
# Every kind of VM the planner tells apart, each carrying the items the listing drops.
FLEET = [
    vm("healthy", status("healthy"), metadata=BULKY),
    vm("due", status("due", issued=NOW - timedelta(hours=13)), metadata=BULKY),
    vm("rotated-ca", status("rotated-ca", ca="ca-old"), metadata=BULKY),
    vm("never", metadata=BULKY),
    vm("waiting", status("waiting", state="waiting"), metadata=BULKY),
    vm("ports", status("ports"), metadata={**BULKY, "mesh-ports": "http:8080"}),
    vm("bad-ports", status("bad-ports"), metadata={**BULKY, "mesh-ports": "http:99999"}),
    vm("legacy", status("legacy"), metadata={**BULKY, names.SECRET_KEY: "projects/1/secrets/s"}),
    vm("stopped", status("stopped", state="stopped"), metadata=BULKY, state="TERMINATED"),
    vm("rekey", status("rekey", rekey="0123456789abcdef.20261121T000000Z"), metadata=BULKY),
    vm("denied", status("denied"), {"mesh-namespace": "istio-system"}, metadata=BULKY),
    vm("moved", status("moved"), metadata=BULKY, address="10.0.0.99"),
    vm("unbound", status("unbound"), metadata=BULKY),
]


# Each VM runs as its own account (vm() names it NAME@x), bound to default/default, but "unbound".
FLEET_SETTINGS = SETTINGS.__class__(**{**SETTINGS.__dict__, "identity_bindings": tuple(
    IdentityBinding(f"{v.key.instance}@x", "default", "default", (v.key.instance,))
    for v in FLEET if v.key.instance != "unbound")})


def served(e: dict) -> dict:
    """A WorkloadEntry as the API server lists it: server fields and spec parts the plan does not read."""
    meta = e["metadata"]
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {**meta, "uid": "u-" + meta["name"], "resourceVersion": "42", "generation": 1,
                         "creationTimestamp": "2026-11-21T00:00:00Z", "managedFields": [{"manager": "meshjoin"}],
                         "labels": {**meta["labels"], names.VM_LABEL: meta["annotations"]["meshjoin.dev/instance"]},
                         "annotations": {**meta["annotations"], "meshjoin.dev/cert-not-after": "2026-11-22T00:00:00Z"}},
            "spec": {**e["spec"], "serviceAccount": "default", "labels": {"app": meta["labels"]["app"]},
                     "network": "", "locality": "us-central1/us-central1-a"}}


def test_the_sweeps_slim_view_plans_exactly_as_the_whole_vm():
    entries = [served(entry(v.key.instance)) for v in FLEET] + [served(entry("orphan")),
                                                               served(entry("ports", ports={"http": 8080}))]
    whole = inventory(FLEET, entries, [], ["legacy", "gone"])
    shared: dict[str, str] = {}
    slim_vms = [vm_from_json(v.key, as_json(v), shared, SWEEP_METADATA_KEYS) for v in FLEET]
    assert all(not s.metadata_complete and set(s.metadata) <= SWEEP_METADATA_KEYS for s in slim_vms)
    assert any(names.SECRET_KEY in s.metadata for s in slim_vms)
    slim_entries = [planning_entry(e, shared) for e in entries]
    assert all("managedFields" not in e["metadata"] and set(e["spec"]) <= {"address", "ports"} for e in slim_entries)
    slim = inventory(slim_vms, slim_entries, [], ["legacy", "gone"])
    planned, planned_slim = plan_sweep(whole, FLEET_SETTINGS, CA, NOW), plan_sweep(slim, FLEET_SETTINGS, CA, NOW)
    assert planned.actions == planned_slim.actions
    # The fleet covers the planner's cases: renewal, re-issue, joins of several kinds, a prune, health.
    reasons = " | ".join(a.reason for a in planned.actions)
    for why in ("renewal", "CA", "address or ports", "metadata mesh-ports", "per-VM secret", "waiting",
                "key rotation", "TERMINATED", "labelled but never handled", "no labelled VM"):
        assert why in reasons, (why, reasons)
    assert planned.healthy >= 1 and planned.denied >= 1
    assert (planned.denied, planned.healthy, planned.prune_candidates, planned.notes) == \
        (planned_slim.denied, planned_slim.healthy, planned_slim.prune_candidates, planned_slim.notes)
    assert fleet_rows(whole, NOW, FLEET_SETTINGS) == fleet_rows(slim, NOW, FLEET_SETTINGS)
    assert soonest_cert_expiry(whole, NOW) == soonest_cert_expiry(slim, NOW)


def test_a_slim_view_is_never_written_back():
    slim = vm_from_json(KEY, as_json(vm("a", status("a"), metadata=BULKY)), None, SWEEP_METADATA_KEYS)
    assert slim.metadata_complete is False and "startup-script" not in slim.metadata
    adapter = ComputeAdapter.__new__(ComputeAdapter)  # no client: the refusal comes before any call
    with pytest.raises(ValueError, match="partial view"):
        adapter.set_metadata(slim, {"meshjoin-status": "{}"})
