"""A joined VM carries at most 4096 bytes of meshjoin metadata (issue 16): the sum of len(key) + len(value),
in UTF-8 bytes, over every item the product writes (the status included), for a realistic worst case driven
through the real reconcile with in-memory fakes: long names, the full chain (leaf and intermediate; the root
is in meshjoin-root-cert once), a sidecar package, the events topic, an istiod address, a mesh id and network,
after a renewal with a key rotation requested."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

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


def test_a_joined_vm_carries_at_most_4096_bytes_of_meshjoin_metadata(plugin_ca):
    world = long_world(plugin_ca)
    world.join(LONG_KEY)
    joined = meshjoin_bytes(world.metadata(LONG_KEY))
    assert world.status(LONG_KEY)["state"] == "joined"
    assert {names.CERT_CHAIN_KEY, names.STARTUP_SCRIPT_KEY, names.STATUS_KEY, names.SIDECAR_URL_KEY,
            names.EVENTS_TOPIC_KEY, names.HOSTS_KEY} <= set(joined)  # the worst case really has them all
    print("joined", sum(joined.values()), joined)
    assert sum(joined.values()) <= BUDGET, joined

    # A renewal that also asks for a new key (meshjoin-rekey) is the largest steady state.
    world.clock.now += timedelta(hours=13)
    world.compute.confirm(LONG_KEY)
    assert world.reconcile(LONG_KEY).verb == "renewed"
    assert names.REKEY_KEY in world.metadata(LONG_KEY)
    after = meshjoin_bytes(world.metadata(LONG_KEY))
    print("renewed", sum(after.values()), after)
    assert sum(after.values()) <= BUDGET, after


def test_the_stub_is_most_of_nothing():
    """The per-VM startup-script is a stub; the agent's text (tens of kB) is in project metadata, once."""
    stub = bootstrap.startup_stub()
    assert len(stub.encode()) < 600 < len(bootstrap.agent_text().encode()) // 50
