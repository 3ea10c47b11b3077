"""meshjoin reads Compute as plain JSON (listings and single VMs): `vm_from_json` must see what the SDK's
type holds, read field by field as meshjoin read it when it used the SDK (`sdk_vm`)."""

from __future__ import annotations

import json

import pytest
from google.cloud import compute_v1

from meshjoin.adapters.compute import SHARED_VALUE_BYTES, vm_from_json
from meshjoin.model import Vm, VmKey

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
    assert len(shared) == 1  # small values are not collected
