"""A joined VM carries at most 4096 bytes of meshjoin metadata (issue 16): the sum of len(key) + len(value),
in UTF-8 bytes, over every item the product writes (the status included), for a realistic worst case driven
through the real reconcile with in-memory fakes: long names, the full chain (leaf and intermediate; the root
is in meshjoin-root-cert once), a sidecar package, the events topic, an istiod address, a mesh id and network,
after a renewal with a key rotation requested. What every VM of a deployment shares is in project metadata."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

from cryptography import x509

from meshjoin import bootstrap, names
from meshjoin.model import VmKey
from meshjoin.settings import IdentityBinding

from .test_hostile_input import FakeCompute, plugin_ca, vm_with  # noqa: F401 (plugin_ca is a fixture)
from .test_keys_stay_on_the_vm import World

BUDGET = 4096
# Long but real: a 30-character project id (the longest allowed), the longest zone name, a 40-character
# instance, Kubernetes names of 24-30 characters.
PROJECT = "acme-payments-prod-eu-west-942"
LONG_KEY = VmKey(PROJECT, "northamerica-northeast1-a", "checkout-worker-blue-2026-11-eu-west-017")
ACCOUNT = f"checkout-worker-blue@{PROJECT}.iam.gserviceaccount.com"
BINDING = IdentityBinding(ACCOUNT, "payments-checkout-prod", "checkout-worker-blue", ("checkout-worker-blue",))


def meshjoin_bytes(metadata: dict[str, str]) -> dict[str, int]:
    """Per item the product writes (the owner's own items, like mesh-ports, are not meshjoin's)."""
    ours = set(names.MESHJOIN_KEYS) | {names.STARTUP_SCRIPT_KEY, names.GUEST_ATTRIBUTES_KEY}
    return {k: len(k.encode()) + len(v.encode()) for k, v in metadata.items() if k in ours}


def long_world(plugin_ca) -> World:
    from .test_hostile_input import SETTINGS

    settings = replace(SETTINGS, project=PROJECT, identity_bindings=(BINDING,), mesh_id="mesh-payments-prod",
                       network="vpc-payments-prod-eu", cluster_id="gke-payments-prod-eu-west1",
                       istiod_address="istiod-asm-1-24.istio-system.svc:15012",
                       sidecar_url="https://storage.googleapis.com/acme-payments-prod-artifacts/istio/"
                                   "istio-sidecar-1.24.3.deb", sidecar_sha256="ab" * 32,
                       events_topic=f"projects/{PROJECT}/topics/meshjoin-events", key_rotation_renewals=1)
    vm = vm_with({"mesh": "join", "mesh-version": "v2026-11-17-rc3"}, {"mesh-ports": "http:8080,grpc:9090,admin:9901"},
                 service_account=ACCOUNT, key=LONG_KEY)
    return World(plugin_ca, settings=settings, vms={LONG_KEY: vm})


def joined_and_renewed(plugin_ca) -> tuple[World, dict[str, int], dict[str, int]]:
    """Bytes per item right after the join, and after a renewal that also asks for a new key (the largest
    steady state: meshjoin-rekey is added)."""
    world = long_world(plugin_ca)
    world.join(LONG_KEY)
    assert world.status(LONG_KEY)["state"] == "joined"
    joined = meshjoin_bytes(world.metadata(LONG_KEY))
    world.clock.now += timedelta(hours=13)
    world.compute.confirm(LONG_KEY)
    assert world.reconcile(LONG_KEY).verb == "renewed"
    assert names.REKEY_KEY in world.metadata(LONG_KEY) and world.status(LONG_KEY)["state"] == "joined"
    return world, joined, meshjoin_bytes(world.metadata(LONG_KEY))


# Every item meshjoin writes on a VM (names.MESHJOIN_KEYS without what now lives in project metadata, or only on
# VMs joined by agent 2, plus GCE's own switch and the startup-script).
PER_VM_ITEMS = {names.STATUS_KEY, names.CERT_CHAIN_KEY, names.REKEY_KEY, names.CLUSTER_ENV_KEY, names.ROOT_CERT_KEY,
                names.STARTUP_SCRIPT_KEY, names.GUEST_ATTRIBUTES_KEY}


def test_what_one_vm_carries_is_said_once(plugin_ca):
    """No item repeats another: the chain stops below the root (meshjoin-root-cert has it), the status is compact
    JSON without the agent's report when it only repeats confirmedSerial, the script is the stub, and what every VM
    of the deployment shares is in project metadata, not on the VM."""
    world, joined, renewed = joined_and_renewed(plugin_ca)
    # The worst case really has every per-VM item (the rekey once asked), and none of the shared ones.
    assert set(joined) == PER_VM_ITEMS - {names.REKEY_KEY} and set(renewed) == PER_VM_ITEMS
    assert set(names.MESHJOIN_KEYS) - {names.SECRET_KEY} - set(names.DEPLOYMENT_KEYS) | \
        {names.STARTUP_SCRIPT_KEY, names.GUEST_ATTRIBUTES_KEY} == PER_VM_ITEMS
    # The shared items of this worst case: every one of them has a value (sidecar, events topic, hosts, mesh id).
    assert set(bootstrap.deployment_items(world.reconciler.settings)) == set(names.DEPLOYMENT_KEYS)
    metadata = world.metadata(LONG_KEY)
    chain = x509.load_pem_x509_certificates(metadata[names.CERT_CHAIN_KEY].encode())
    roots = x509.load_pem_x509_certificates(metadata[names.ROOT_CERT_KEY].encode())
    assert len(chain) == 2 and not set(chain) & set(roots)
    status = metadata[names.STATUS_KEY]
    assert json.dumps(json.loads(status), sort_keys=True, separators=(",", ":")) == status
    assert "agent" not in json.loads(status) and json.loads(status)["confirmedSerial"]
    assert metadata[names.STARTUP_SCRIPT_KEY] == bootstrap.startup_stub()


def test_a_joined_vm_carries_at_most_4096_bytes_of_meshjoin_metadata(plugin_ca):
    _, joined, renewed = joined_and_renewed(plugin_ca)
    assert max(sum(joined.values()), sum(renewed.values())) <= BUDGET, (joined, renewed)


def test_copies_of_shared_items_written_before_are_removed(plugin_ca):
    """A VM joined before the shared items moved to project metadata carries meshjoin's own copies of them; the
    agent reads an instance item first, so a copy left there would shadow the project's value for ever. The next
    reconcile removes them (and writes nothing else of theirs)."""
    world = long_world(plugin_ca)
    world.join(LONG_KEY)
    shared = bootstrap.deployment_items(world.reconciler.settings)
    world.compute.vms[LONG_KEY].metadata.update({**shared, names.HOSTS_KEY: ""})  # as earlier versions wrote them
    world.clock.now += timedelta(hours=1)
    world.reconcile(LONG_KEY)
    metadata = world.metadata(LONG_KEY)
    assert not set(metadata) & set(names.DEPLOYMENT_KEYS), sorted(metadata)
    assert world.status(LONG_KEY)["state"] == "joined" and metadata["mesh-ports"]  # the owner's own item stays


def test_the_stub_is_most_of_nothing():
    """The per-VM startup-script is a stub; the agent's text (tens of kB) is in project metadata, once."""
    stub = bootstrap.startup_stub()
    assert len(stub.encode()) < 600 < len(bootstrap.agent_text().encode()) // 50
