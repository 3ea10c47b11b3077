"""A joined VM carries at most 4096 bytes of meshjoin metadata (issue 16): the sum of len(key) + len(value),
in UTF-8 bytes, over every item the product writes (the status included), for a realistic worst case driven
through the real reconcile with in-memory fakes: long names, the full chain (leaf and intermediate; the root
is in meshjoin-root-cert once), a sidecar package, the events topic, an istiod address, a mesh id and network,
after a renewal with a key rotation requested."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
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


def test_what_one_vm_carries_is_said_once(plugin_ca):
    """No item repeats another: the chain stops below the root (meshjoin-root-cert has it), the status is compact
    JSON without the agent's report when it only repeats confirmedSerial, the script is the stub."""
    world, joined, renewed = joined_and_renewed(plugin_ca)
    # The worst case really has every item.
    assert {names.CERT_CHAIN_KEY, names.STARTUP_SCRIPT_KEY, names.STATUS_KEY, names.SIDECAR_URL_KEY,
            names.EVENTS_TOPIC_KEY, names.HOSTS_KEY} <= set(joined) and names.REKEY_KEY in renewed
    metadata = world.metadata(LONG_KEY)
    chain = x509.load_pem_x509_certificates(metadata[names.CERT_CHAIN_KEY].encode())
    roots = x509.load_pem_x509_certificates(metadata[names.ROOT_CERT_KEY].encode())
    assert len(chain) == 2 and not set(chain) & set(roots)
    status = metadata[names.STATUS_KEY]
    assert json.dumps(json.loads(status), sort_keys=True, separators=(",", ":")) == status
    assert "agent" not in json.loads(status) and json.loads(status)["confirmedSerial"]
    assert metadata[names.STARTUP_SCRIPT_KEY] == bootstrap.startup_stub()
    assert "\n" not in metadata[names.MESH_CONFIG_KEY].rstrip("\n")


# The gap: what every VM of a deployment shares (root and intermediate certificates, mesh config, hosts, key
# algorithm, sidecar package, events topic: about 2,000 bytes here) is still written to each VM. Moving it to
# project metadata needs an agent that reads project attributes for the items its instance lacks (README,
# "Metadata size"). strict: this fails loudly once the target is met, so the mark cannot outlive the gap.
@pytest.mark.xfail(strict=True, reason="issue 16's 4,096-byte target is not met yet: about 5,100 bytes in this "
                                       "worst case (5,500 once a rekey is asked), 4,369 on the sandbox's joined VM (README, 'Metadata size')")
def test_a_joined_vm_carries_at_most_4096_bytes_of_meshjoin_metadata(plugin_ca):
    _, joined, renewed = joined_and_renewed(plugin_ca)
    assert max(sum(joined.values()), sum(renewed.values())) <= BUDGET, (joined, renewed)


def test_the_stub_is_most_of_nothing():
    """The per-VM startup-script is a stub; the agent's text (tens of kB) is in project metadata, once."""
    stub = bootstrap.startup_stub()
    assert len(stub.encode()) < 600 < len(bootstrap.agent_text().encode()) // 50
