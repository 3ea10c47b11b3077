"""Pure decisions of the reconcile: when a VM needs a new certificate, when it has traces to clean."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin import names
from meshjoin.model import Vm, VmKey
from meshjoin.reconcile import Delivered, has_traces, needs_new_cert
from meshjoin.settings import Settings

SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/r/clusters/c",
                    renew_fraction=0.5, renew_jitter_fraction=0.1)
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SPIFFE = "spiffe://cluster.local/ns/default/sa/default"
VM = Vm(VmKey("my-project", "us-central1-a", "vm-1"), "42", {"mesh": "join"}, {}, "fp", "10.0.0.2", "sa@x")
GOOD = Delivered(SPIFFE, "42", "ca1", "projects/1/secrets/s/versions/1", T0, T0 + timedelta(hours=24))


@pytest.mark.parametrize("delivered, now, force, ca, expected", [
    pytest.param(None, T0, False, "ca1", "no certificate delivered yet", id="never joined"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca1", None, id="fresh cert: nothing to do"),
    pytest.param(GOOD, T0 + timedelta(hours=1), True, "ca1", "forced", id="forced"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca2", "the CA changed", id="CA rotated"),
    pytest.param(GOOD, T0 + timedelta(hours=12, minutes=1), False, "ca1",
                 "the certificate reached its renewal point", id="past 50% of life"),
    pytest.param(GOOD, T0 + timedelta(hours=9, minutes=30), False, "ca1", None,
                 id="before earliest jittered point"),
    pytest.param(GOOD, T0 + timedelta(days=3), False, "ca1", "the certificate reached its renewal point",
                 id="long expired (VM powered off)"),
    pytest.param(Delivered(SPIFFE, "41", "ca1", "v", T0, T0 + timedelta(hours=24)), T0, False, "ca1",
                 "the VM was recreated", id="new instance id"),
    pytest.param(Delivered("spiffe://cluster.local/ns/apps/sa/x", "42", "ca1", "v", T0, T0 + timedelta(hours=24)),
                 T0, False, "ca1", "the identity changed", id="identity moved"),
])
def test_needs_new_cert(delivered, now, force, ca, expected):
    assert needs_new_cert(delivered, vm=VM, spiffe=SPIFFE, ca_fingerprint=ca, now=now, settings=SETTINGS,
                          force=force) == expected


def test_delivered_from_status_round_trip_and_garbage():
    status = {"identity": SPIFFE, "instanceId": "42", "caFingerprint": "ca1", "secret": "v",
              "certNotBefore": "2026-11-01T00:00:00Z", "certNotAfter": "2026-11-02T00:00:00Z"}
    assert Delivered.from_status(status).not_after == T0 + timedelta(hours=24)
    assert Delivered.from_status({**status, "certNotAfter": "tomorrow"}) is None
    assert Delivered.from_status({}) is None


@pytest.mark.parametrize("metadata, expected", [
    pytest.param({}, False, id="never touched"),
    pytest.param({"startup-script": "echo owner"}, False, id="owner's items only"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "denied"})}, False, id="denied before"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "left"})}, False, id="left before"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "joined"})}, True, id="joined"),
    pytest.param({names.SECRET_KEY: "projects/1/secrets/s/versions/1"}, True, id="bootstrap item left"),
    pytest.param({names.STATUS_KEY: "not json"}, False, id="status overwritten by owner"),
])
def test_has_traces(metadata, expected):
    vm = Vm(VM.key, "42", {}, metadata, "fp", "10.0.0.2", "sa@x")
    assert has_traces(vm) is expected
