"""The control plane's bulk seeding (`POST /seed`, used by the benchmarks) and benchmark worlds' boots."""

from __future__ import annotations

import pytest

from meshjoin_sandbox.compute import ComputeEmulator
from meshjoin_sandbox.guest import Guests
from meshjoin_sandbox.secretmanager import SecretManagerEmulator
from meshjoin_sandbox.seed import seed_fleet
from meshjoin_sandbox.server import skip_startup_scripts
from meshjoin_sandbox.web import ApiError
from meshjoin_sandbox.world import World

ZONE = "us-central1-a"


@pytest.fixture
def world():
    world = World()
    world.publish_audit = lambda entry: None
    ComputeEmulator(world)
    SecretManagerEmulator(world)
    return world


def test_seeded_vms_carry_their_agents_guest_attributes_filled_per_vm(world):
    seed_fleet(world, {"zone": ZONE, "prefix": "fleet-", "start": 0, "count": 3, "labels": {"mesh": "join"},
                       "metadata": {"meshjoin-status": '{"instanceId": "@@ID@@"}'},
                       "guest_attributes": {"meshjoin": {"csr": "CSR of @@NAME@@", "sidecar": "running"}}})
    compute = world.emulators["compute"]
    ids = set()
    for index in range(3):
        instance = compute.instance(ZONE, f"fleet-{index:05d}")
        ids.add(instance["id"])
        assert compute.guest_attributes.query(instance["id"], "meshjoin/") == [
            {"namespace": "meshjoin", "key": "csr", "value": f"CSR of fleet-{index:05d}"},
            {"namespace": "meshjoin", "key": "sidecar", "value": "running"}]
        assert compute.metadata_value(ZONE, f"fleet-{index:05d}", "meshjoin-status") == \
            f'{{"instanceId": "{instance["id"]}"}}'
    assert len(ids) == 3
    # Seeding is not the VM writing: its own write budget (10 a minute, 3 a second) is untouched.
    first = compute.instance(ZONE, "fleet-00000")["id"]
    for key in ("a", "b", "c"):
        compute.guest_attributes.put(first, "meshjoin", key, "x")


def test_index9_makes_an_item_unique_per_vm_at_a_fixed_width(world):
    """The scale benchmark gives each VM its own certificate chain: nine digits in place of nine characters."""
    seed_fleet(world, {"zone": ZONE, "prefix": "fleet-", "start": 41, "count": 2,
                       "metadata": {"meshjoin-cert-chain": "ABC@@INDEX9@@DEF", "startup-script": "shared"}})
    compute = world.emulators["compute"]
    assert [compute.metadata_value(ZONE, f"fleet-{i:05d}", "meshjoin-cert-chain") for i in (41, 42)] == \
        ["ABC000000041DEF", "ABC000000042DEF"]


def test_seeding_without_secrets_creates_none(world):
    seed_fleet(world, {"zone": ZONE, "prefix": "fleet-", "count": 2, "metadata": {}})
    assert world.emulators["secretmanager"]._secrets == {}


def test_legacy_secrets_are_seeded_for_every_kth_vm_with_their_labels(world):
    seed_fleet(world, {"zone": ZONE, "prefix": "fleet-", "count": 5, "secret_every": 2,
                       "secret": {"id": "meshjoin-vm-p-@@ZONE@@-@@NAME@@", "data": "(seeded)",
                                  "labels": {"meshjoin-instance": "@@NAME@@"}}})
    secrets = world.emulators["secretmanager"]._secrets
    assert sorted(secrets) == [f"meshjoin-vm-p-{ZONE}-fleet-{i:05d}" for i in (0, 2, 4)]
    assert secrets[f"meshjoin-vm-p-{ZONE}-fleet-00002"].fields["labels"] == {"meshjoin-instance": "fleet-00002"}


def test_malformed_guest_attributes_are_refused(world):
    with pytest.raises(ApiError) as refused:
        seed_fleet(world, {"zone": ZONE, "count": 1, "guest_attributes": {"meshjoin": "not a mapping"}})
    assert refused.value.status == 400


def test_boots_without_startup_scripts_are_counted_and_start_no_script_runner(world, tmp_path, monkeypatch):
    guests = Guests(world, tmp_path)
    started = []
    monkeypatch.setattr(guests, "run_startup", lambda *args: started.append(args))
    skip_startup_scripts(guests)
    world.emulators["compute"]._booted(ZONE, "vm-1")  # what the lifecycle calls when a VM reaches RUNNING
    world.emulators["compute"]._booted(ZONE, "vm-1")
    assert guests.boots == {(ZONE, "vm-1"): 2}
    assert started == []  # the real boot hands run_startup to a thread; none was started
    assert guests.metadata_host(ZONE, "vm-1").startswith("127.0.0.1:")  # the VM still has its metadata server
