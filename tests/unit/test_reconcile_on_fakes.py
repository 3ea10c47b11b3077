"""The reconcile's life cycles on the in-memory fakes (adapters/*_fake.py): no I/O, the real services' rules.

Renewal at the renewal point, CA rotation (re-issue for the same key, then nothing from the old CA is
delivered again), a new key from the VM (rotation), and the 412 races: two passes over one VM, and a pass
interleaved with an operator's leave. The fakes keep what these depend on: setMetadata's fingerprint
(412 on a stale one), the sweep's slim paged listing, owned-only writes in the cluster.

The VM's status is read as the JSON it is (the encoding is compact, sorted JSON), not through the product's
decoder: these tests watch what the VM and its owner see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshjoin import names, pki
from meshjoin.adapters.compute_fake import FakeCompute
from meshjoin.adapters.kube_fake import FakeKube
from meshjoin.adapters.secrets import PluginCa
from meshjoin.adapters.secrets_fake import FakeSecrets
from meshjoin.model import VmKey
from meshjoin.reconcile import Reconciler
from meshjoin.sweep import RENEW, Sweeper, plan_sweep

from .test_hostile_input import KEY, NOW, SETTINGS, plugin_ca, vm_with  # noqa: F401 - plugin_ca is a fixture

ENTRY = ("WorkloadEntry", "default", "vm-1-us-central1-a-my-project")
SECOND = VmKey(KEY.project, KEY.zone, "vm-2")
MICROSECOND = timedelta(microseconds=1)


class Clock:
    def __init__(self, now: datetime = NOW):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def status_of(compute: FakeCompute, key: VmKey = KEY) -> dict:
    return json.loads(compute.vms[key].metadata[names.STATUS_KEY])


class World:
    """One deployment on the fakes: Compute, Secret Manager, the cluster, a clock; the VMs' agents act
    through FakeCompute.hand_in_key / confirm."""

    def __init__(self, secrets: FakeSecrets, keys=(KEY,), kube: FakeKube | None = None):
        self.clock = Clock()
        self.compute = FakeCompute({key: vm_with({"mesh": "join"}, {}, key=key) for key in keys})
        self.secrets = secrets
        self.kube = kube or FakeKube()
        self.reconciler = Reconciler(SETTINGS, self.compute, self.secrets, self.kube, clock=self.clock)
        self.sweeper = Sweeper(SETTINGS, self.reconciler, clock=self.clock)

    def join(self, key: VmKey = KEY):
        """Bootstrap, the agent's CSR, the certificate, the agent's confirmation: a joined VM."""
        assert self.reconciler.reconcile(key).verb == "bootstrapped"
        vm_key = self.compute.hand_in_key(key)
        assert self.reconciler.reconcile(key).verb == "delivered"
        self.compute.confirm(key)
        assert self.reconciler.reconcile(key).verb == "registered"
        return vm_key

    def status(self, key: VmKey = KEY) -> dict:
        return status_of(self.compute, key)

    def chain(self, key: VmKey = KEY) -> str:
        return self.compute.vms[key].metadata[names.CERT_CHAIN_KEY]

    def planned(self) -> list[tuple[str, VmKey]]:
        """What the sweep would do now, from its own listings (the fake's slim, paged views)."""
        plan = plan_sweep(self.sweeper.inventory(), SETTINGS, self.secrets.plugin_ca().fingerprint, self.clock())
        return [(action.kind, action.key) for action in plan.actions]


def rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def leaf(chain: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain.encode())


def issued_by(chain: str, ca: PluginCa) -> bool:
    try:
        leaf(chain).verify_directly_issued_by(ca.bundle.ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # another signature, issuer name or key type
        return False
    return True


# --- renewal -----------------------------------------------------------------------------------------------


def test_renewal_happens_at_the_renewal_point_and_not_a_microsecond_before(plugin_ca):
    world = World(FakeSecrets(plugin_ca))
    vm_key = world.join()
    first = world.status()
    renew_at = pki.renewal_time(rfc3339(first["certNotBefore"]), rfc3339(first["certNotAfter"]),
                                renew_fraction=SETTINGS.renew_fraction,
                                jitter_fraction=SETTINGS.renew_jitter_fraction, jitter_key=str(KEY))
    assert NOW < renew_at < NOW + SETTINGS.cert_ttl

    # Just before: the sweep plans nothing, and a pass over the VM reads nothing more and writes nothing.
    world.clock.now = renew_at - MICROSECOND
    assert world.planned() == []
    writes, guest_reads = world.compute.writes, world.compute.guest_reads
    assert world.reconciler.reconcile(KEY, read_agent=False).verb == "unchanged"
    assert (world.compute.writes, world.compute.guest_reads) == (writes, guest_reads)

    # At the point: the sweep plans the renewal, the pass re-certifies the same key; the VM stays routed.
    world.clock.now = renew_at
    assert world.planned() == [(RENEW, KEY)]
    assert world.reconciler.reconcile(KEY, read_agent=False).verb == "renewed"
    renewed = world.status()
    assert renewed["state"] == "joined" and renewed["keyId"] == first["keyId"] and renewed["keyCerts"] == "2"
    assert renewed["certSerial"] != first["certSerial"] and renewed["confirmedSerial"] == first["certSerial"]
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    assert leaf(world.chain()).not_valid_after_utc > rfc3339(first["certNotAfter"])
    assert ENTRY in world.kube.objects

    # Once renewed, nothing is due until the new certificate's own renewal point.
    assert world.planned() == []
    world.compute.confirm(KEY)  # the VM's watcher installs it and reports its serial
    assert world.reconciler.reconcile(KEY).verb == "refreshed"  # records the report
    after = world.status()
    assert renewed["certSerial"] in after["agent"] and not after.get("warnings")  # it serves the renewal
    assert after["certSerial"] == renewed["certSerial"] and after["state"] == "joined"


# --- CA rotation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaFiles:
    cert: bytes
    key: bytes
    chain: bytes
    roots: tuple[str, ...]  # one PEM per root, newest first


def ca_files(directory) -> CaFiles:
    roots = x509.load_pem_x509_certificates((directory / "root-cert.pem").read_bytes())
    return CaFiles(*((directory / n).read_bytes() for n in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem")),
                   tuple(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots))


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory) -> tuple[CaFiles, CaFiles]:
    """The CA in use, and its successor under a new root whose root-cert.pem trusts both roots."""
    from meshjoin_sandbox.ca import make_plugin_ca, make_rotated_ca

    old, new = tmp_path_factory.mktemp("old-ca"), tmp_path_factory.mktemp("new-ca")
    make_plugin_ca(old, root_name="old root")
    make_rotated_ca(new, old, root_name="new root", include_old_roots=True)
    return ca_files(old), ca_files(new)


def test_a_ca_rotation_re_issues_for_the_same_key_then_nothing_from_the_old_ca_is_delivered(two_cas):
    old, new = two_cas
    secrets = FakeSecrets(None)  # no CA until its four secrets have versions
    old_ca = secrets.rotate_ca(old.cert, old.key, old.chain, old.roots, "1")
    world = World(secrets)
    vm_key = world.join()
    first = world.status()
    assert issued_by(world.chain(), old_ca) and first["caFingerprint"] == old_ca.fingerprint
    old_root, new_root = old.roots[0], new.roots[0]
    assert new.roots == (new_root, old_root)

    # Step 1: a new signing CA under a new root; VMs trust both roots while certificates are re-issued.
    new_ca = secrets.rotate_ca(new.cert, new.key, new.chain, new.roots, "2")
    assert new_ca.fingerprint != old_ca.fingerprint
    assert world.planned() == [("reissue", KEY)]
    delivered_before = len(world.compute.received)
    assert world.reconciler.reconcile(KEY, read_agent=False).verb == "reissued"
    status = world.status()
    assert status["state"] == "joined" and status["keyId"] == first["keyId"]  # the same key, no VM action needed
    assert status["caFingerprint"] == new_ca.fingerprint and status["certSerial"] != first["certSerial"]
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    assert issued_by(world.chain(), new_ca) and not issued_by(world.chain(), old_ca)
    roots = world.compute.vms[KEY].metadata[names.ROOT_CERT_KEY]
    assert old_root in roots and new_root in roots  # both trusted during the rotation
    world.compute.confirm(KEY)

    # A VM joining now gets a certificate of the new CA only.
    world.compute.vms[SECOND] = vm_with({"mesh": "join"}, {}, key=SECOND)
    world.join(SECOND)
    assert issued_by(world.chain(SECOND), new_ca)

    # Step 2: the old root's version is disabled: the roots change, so every VM is re-issued once more.
    retiring = len(world.compute.received)
    retired = secrets.rotate_ca(new.cert, new.key, new.chain, (new_root,), "3")
    assert retired.fingerprint not in (old_ca.fingerprint, new_ca.fingerprint)
    assert sorted(world.planned()) == [("reissue", KEY), ("reissue", SECOND)]
    world.sweeper.sweep()
    for key in (KEY, SECOND):
        assert world.status(key)["caFingerprint"] == retired.fingerprint and world.status(key)["state"] == "joined"
        assert world.compute.vms[key].metadata[names.ROOT_CERT_KEY].count("BEGIN CERTIFICATE") == 1
        assert old_root not in world.compute.vms[key].metadata[names.ROOT_CERT_KEY]
        world.compute.confirm(key)
    assert world.planned() == []

    # Since the rotation began, every chain meshjoin delivered is the new CA's: none of the old one's.
    chains = [value for item, value in world.compute.received[delivered_before:] if item == names.CERT_CHAIN_KEY]
    assert len(chains) == 4  # KEY twice (two rotation steps), SECOND at its join and at step 2
    assert all(issued_by(chain, new_ca) and not issued_by(chain, old_ca) for chain in chains)
    roots_since = [value for item, value in world.compute.received[retiring:] if item == names.ROOT_CERT_KEY]
    assert roots_since and all(value == new_root for value in roots_since)  # the old root is trusted no more


# --- a new key ---------------------------------------------------------------------------------------------


def test_a_new_key_from_the_vm_is_certified_at_once_and_the_old_key_never_again(plugin_ca):
    world = World(FakeSecrets(plugin_ca))
    old_key = world.join()
    first = world.status()

    new_key = world.compute.hand_in_key(KEY)  # the agent rotated (on its own): a new key, its CSR, a nudge
    assert world.reconciler.reconcile(KEY).verb == "rotated"
    status = world.status()
    assert status["state"] == "joined" and ENTRY in world.kube.objects  # a rotation keeps the VM routed
    assert status["keyId"] == pki.key_id(new_key.public_key()) != first["keyId"] and status["keyCerts"] == "1"
    assert pki.chain_key_id(world.chain()) == status["keyId"]
    world.compute.confirm(KEY)
    assert world.reconciler.reconcile(KEY).verb == "refreshed"  # records the report

    # Its renewals re-certify the new key; nothing certifies the old one again.
    world.clock.now = NOW + SETTINGS.cert_ttl * 0.9
    assert world.reconciler.reconcile(KEY, read_agent=False).verb == "renewed"
    assert world.status()["keyId"] == status["keyId"] and world.status()["keyCerts"] == "2"
    chains = [value for item, value in world.compute.received if item == names.CERT_CHAIN_KEY]
    assert [pki.chain_key_id(c) for c in chains] == [first["keyId"], status["keyId"], status["keyId"]]
    assert pki.key_id(old_key.public_key()) == first["keyId"]


# --- the 412 races -----------------------------------------------------------------------------------------


def test_two_passes_over_one_vm_deliver_one_certificate(plugin_ca):
    """The agent's nudge and a sweep reach the VM at once: both read it and certify its CSR, one writes first.
    The other's write is refused (412); it re-reads, finds the key certified, and delivers nothing more."""

    class InterleavingCompute(FakeCompute):
        other_pass = None

        def set_metadata(self, vm, items, remove=frozenset()):
            other, self.other_pass = self.other_pass, None
            if other:
                other()  # the other pass read the VM too, and writes first
            super().set_metadata(vm, items, remove)

    compute = InterleavingCompute({KEY: vm_with({"mesh": "join"}, {})})
    secrets, kube = FakeSecrets(plugin_ca), FakeKube()
    nudge = Reconciler(SETTINGS, compute, secrets, kube, clock=lambda: NOW)
    sweep = Reconciler(SETTINGS, compute, secrets, kube, clock=lambda: NOW)
    assert nudge.reconcile(KEY).verb == "bootstrapped"
    vm_key = compute.hand_in_key(KEY)
    outcomes = []
    compute.other_pass = lambda: outcomes.append(nudge.reconcile(KEY))
    outcomes.append(sweep.reconcile(KEY))
    assert [o.verb for o in outcomes] == ["delivered", "rechecked"]  # the sweep lost the race, then re-decided
    chains = [value for item, value in compute.received if item == names.CERT_CHAIN_KEY]
    assert len(chains) == 1 and pki.chain_key_id(chains[0]) == pki.key_id(vm_key.public_key())
    assert status_of(compute)["certSerial"] == format(leaf(chains[0]).serial_number, "x")
    assert status_of(compute)["state"] == "waiting" and kube.objects == {}


def _joined_vm(plugin_ca, kube):
    """A VM meshjoin bootstrapped, certified and registered, its agent having confirmed."""
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})})
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), kube, clock=lambda: NOW)
    reconciler.reconcile(KEY)
    compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    compute.confirm(KEY)
    assert reconciler.reconcile(KEY).verb == "registered"
    return compute, reconciler


@pytest.mark.parametrize("applied_before_leave", [True, False])
def test_a_leave_racing_a_pass_that_registers_leaves_no_entry(plugin_ca, applied_before_leave):
    """The agent's nudge and an operator's `meshjoin leave` at the same time (seen in CI): the pass read the VM
    before the leave, and writes the entry just before or just after the leave removed it. Whatever the order,
    no entry is left; the pass loses its metadata write (412) and re-decides from what the leave wrote."""

    class RacingKube(FakeKube):
        leave = None

        def apply_owned(self, obj, existing):
            leave, self.leave = self.leave, None
            if leave and not applied_before_leave:
                leave()
            stored = super().apply_owned(obj, existing)
            if leave and applied_before_leave:
                leave()
            return stored

    kube = RacingKube()
    compute, reconciler = _joined_vm(plugin_ca, kube)
    del kube.objects[ENTRY]  # the pass below re-applies it, so the race happens inside it
    operator = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), kube, clock=lambda: NOW)
    kube.leave = lambda: operator.leave(KEY)
    outcome = reconciler.reconcile(KEY, read_agent=True)
    assert ENTRY not in kube.objects
    # The VM still carries mesh=join: the pass's retry starts it afresh, unconfirmed, so it is not routed.
    assert outcome.state == "waiting"
    assert status_of(compute)["state"] == "waiting"


def test_a_pass_that_reapplies_an_entry_writes_metadata_to_learn_of_a_race(plugin_ca):
    """A pass that re-created a missing entry but has nothing else to change still writes the status, with the
    fingerprint it read: that write is what tells it that an operator's leave came in between."""
    kube = FakeKube()
    compute, reconciler = _joined_vm(plugin_ca, kube)
    writes = compute.writes
    assert reconciler.reconcile(KEY).verb == "unchanged" and compute.writes == writes
    del kube.objects[ENTRY]
    assert reconciler.reconcile(KEY).verb == "refreshed" and compute.writes == writes + 1
