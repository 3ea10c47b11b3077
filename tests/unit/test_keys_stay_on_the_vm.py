"""Issue 14 on in-memory fakes: the VM makes its key, meshjoin certifies the CSR its agent hands in.

Each test drives the reconcile (and the sweep) the way production does: the agent writes its CSR to guest
attributes and confirms through them (FakeCompute.hand_in_key / confirm). The fakes record every value
meshjoin hands them; `leak_scan` checks that no private key, nor any piece of the test VMs' keys, is in
any of it. Secret Manager is asked for nothing but the CA on a join, a renewal or a rotation.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography import x509

from meshjoin import bootstrap, names, pki
from meshjoin.status import Status
from meshjoin.adapters.compute import StaleFingerprint, guest_items
from meshjoin.adapters.secrets import PluginCa
from meshjoin.fleet import explain
from meshjoin.model import Vm
from meshjoin.plan import RUN_AGENT_REMEDY
from meshjoin.reconcile import Reconciler
from meshjoin.sweep import JOIN, RENEW, Inventory, Sweeper, plan_sweep

from .test_hostile_input import (KEY, NOW, SETTINGS, FakeCompute, FakeKube, FakeSecrets, LogCapture,  # noqa: F401
                                 plugin_ca, vm_with)
from .vm_keys import csr_pem, ec_key, private_pem, rsa_key, secrets_of, tampered_csr_pem

SPIFFE = "spiffe://cluster.local/ns/default/sa/default"
ENTRY = "default/vm-1-us-central1-a-my-project"
HOUR = timedelta(hours=1)


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now


@pytest.fixture
def logs():
    capture = LogCapture()
    logger = logging.getLogger("meshjoin")
    logger.addHandler(capture)
    yield capture.stream
    logger.removeHandler(capture)


class World:
    def __init__(self, ca: PluginCa, settings=SETTINGS, vms=None, legacy=()):
        self.clock = Clock()
        self.compute = FakeCompute(vms or {KEY: vm_with({"mesh": "join"}, {})})
        self.kube = FakeKube()
        self.secrets = FakeSecrets(ca, legacy=legacy)
        self.reconciler = Reconciler(settings, self.compute, self.secrets, self.kube, clock=self.clock)
        self.sweeper = Sweeper(settings, self.reconciler, clock=self.clock)
        self.outcomes = []

    def reconcile(self, key=KEY, **kwargs):
        outcome = self.reconciler.reconcile(key, **kwargs)
        self.outcomes.append(outcome)
        return outcome

    def status(self, key=KEY) -> dict:
        return Status.decode(self.compute.vms[key].metadata.get(names.STATUS_KEY)).wire()

    def metadata(self, key=KEY) -> dict:
        return dict(self.compute.vms[key].metadata)

    def chain(self, key=KEY) -> str:
        return self.compute.vms[key].metadata[names.CERT_CHAIN_KEY]

    def entries(self) -> list[str]:
        return sorted(f"{ns}/{name}" for (kind, ns, name) in self.kube.objects if kind == "WorkloadEntry")

    def join(self, key=KEY, vm_key=None):
        """The whole first join: bootstrap, the agent's CSR, the certificate, the agent's confirmation."""
        assert self.reconcile(key).state == "waiting"
        vm_key = self.compute.hand_in_key(key, vm_key)
        assert self.reconcile(key).verb == "delivered"
        self.compute.confirm(key)
        assert self.reconcile(key).verb == "registered"
        return vm_key


def leak_scan(world: World, logs: io.StringIO, vm_keys) -> None:
    """No private key, and no piece of any VM key, in anything meshjoin wrote or logged."""
    written = [value for _, value in world.compute.received]
    written += [json.dumps(dict(vm.metadata)) for vm in world.compute.vms.values()]
    written += [json.dumps(obj) for obj in world.kube.objects.values()]
    written += [json.dumps(o.details, default=str) + o.reason for o in world.outcomes]
    written += world.secrets.calls + [logs.getvalue()]
    text = "\n".join(written)
    assert "PRIVATE KEY" not in text
    for vm_key in vm_keys:
        for secret in secrets_of(vm_key):
            assert secret not in text


def leaf(chain: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain.encode())


# --- the first join -------------------------------------------------------------------------------------------


def test_first_join_waits_for_the_key_then_certifies_the_csr_with_no_secret_write(plugin_ca, logs):
    world = World(plugin_ca)
    outcome = world.reconcile()
    status = world.status()
    assert (outcome.verb, status["state"]) == ("bootstrapped", "waiting")
    assert "waiting for the VM's key" in status["reason"] and "meshjoin/csr" in status["reason"]
    assert "google_metadata_script_runner startup" in status["reason"]  # the remedy
    assert names.CERT_CHAIN_KEY not in world.metadata() and "keyId" not in status
    # What the agent generates is the deployment's (project metadata), not written per VM.
    assert names.KEY_ALGORITHM_KEY not in world.metadata()
    assert bootstrap.deployment_items(world.reconciler.settings)[names.KEY_ALGORITHM_KEY] == "ecdsa-p256"
    assert world.entries() == []

    vm_key = world.compute.hand_in_key(KEY)
    outcome = world.reconcile()
    status = world.status()
    assert (outcome.verb, status["state"]) == ("delivered", "waiting") and world.entries() == []
    cert = leaf(world.chain())
    assert pki.key_id(cert.public_key()) == pki.key_id(vm_key.public_key()) == status["keyId"]
    assert format(cert.serial_number, "x") == status["certSerial"] and status["keyCerts"] == "1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SPIFFE)]
    cert.verify_directly_issued_by(plugin_ca.bundle.ca_cert)  # chains to the mesh's CA
    leaf_pem = world.chain()[:-len(plugin_ca.bundle.issuers_pem)]  # the leaf, then the CA's chain but its root
    assert world.chain().endswith(plugin_ca.bundle.issuers_pem) and len(x509.load_pem_x509_certificates(
        leaf_pem.encode())) == 1

    world.compute.confirm(KEY)
    assert world.reconcile().verb == "registered"
    status = world.status()
    assert status["state"] == "joined" and status["confirmedSerial"] == status["certSerial"]
    assert world.entries() == [ENTRY]
    assert world.secrets.calls == []  # no Secret Manager call but the (cached) CA read
    leak_scan(world, logs, [vm_key])


@pytest.mark.parametrize("csr, why", [
    (lambda: tampered_csr_pem(ec_key()), "signature does not verify"),
    (lambda: csr_pem(rsa_key()), "allows EC P-256 keys only"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\n$(reboot)\n-----END CERTIFICATE REQUEST-----\n", "not a parsable"),
    (lambda: csr_pem(ec_key()) + csr_pem(ec_key()), "2 CSRs"),
], ids=["wrong signature", "RSA when EC is required", "garbage", "two CSRs"])
def test_an_invalid_csr_is_never_signed_and_the_status_says_why(plugin_ca, csr, why):
    world = World(plugin_ca)
    assert world.reconcile().verb == "bootstrapped"  # the agent acts once the bootstrap is there
    world.compute.guest[KEY] = {names.CSR_ATTRIBUTE: csr()}
    outcome = world.reconcile()
    assert outcome.state == "waiting" and why in world.status()["reason"]
    assert names.CERT_CHAIN_KEY not in world.metadata() and world.entries() == []
    result = explain(KEY, world.compute.vms[KEY], SETTINGS, entry_exists=False, now=NOW,
                     agent_report=world.compute.guest[KEY])
    assert why in result.facts["CSR"] and any("refused" in advice for advice in result.advice)


def test_names_a_csr_asks_for_are_ignored(plugin_ca):
    world = World(plugin_ca)
    world.reconcile()  # the bootstrap
    vm_key = ec_key()
    world.compute.vm_keys[KEY] = vm_key
    world.compute.guest[KEY] = {names.CSR_ATTRIBUTE: csr_pem(
        vm_key, common_name="istiod", uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",),
        dns=("istiod.istio-system.svc",))}
    world.reconcile()
    cert = leaf(world.chain())
    assert cert.subject == x509.Name([])
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
        [x509.UniformResourceIdentifier(SPIFFE)]


# --- renewals, rotations, CA changes ----------------------------------------------------------------------------


def test_renewal_re_certifies_the_current_key_and_the_vm_need_not_act(plugin_ca, logs):
    world = World(plugin_ca)
    vm_key = world.join()
    first = world.status()
    world.clock.now = NOW + 13 * HOUR  # past the renewal point
    plan = plan_sweep(world.sweeper.inventory(), SETTINGS, plugin_ca.fingerprint, world.clock.now)
    assert [(a.kind, a.key) for a in plan.actions] == [(RENEW, KEY)]
    summary = world.sweeper.sweep()
    status = world.status()
    assert summary.counts["renewed"] == 1 and status["state"] == "joined"
    assert status["keyId"] == first["keyId"] and status["keyCerts"] == "2"
    assert status["certSerial"] != first["certSerial"] and status["confirmedSerial"] == first["certSerial"]
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    assert names.REKEY_KEY not in world.metadata()  # 2 certificates for a key: within the policy
    assert set(world.secrets.calls) == {"secrets.list"}  # the sweep's listing of legacy secrets, nothing else
    assert world.entries() == [ENTRY]
    leak_scan(world, logs, [vm_key])


def test_explain_echoes_only_a_rotation_request_meshjoin_could_have_written(plugin_ca):
    """The owner writes their status: a `rekey` that is no token of meshjoin's (here a terminal escape) is no
    request, in `meshjoin explain` as in the reconcile and the sweep."""
    world = World(plugin_ca)
    world.join()
    status, vm = world.status(), world.compute.vms[KEY]
    for rekey, shown in ((status["keyId"] + ".\x1b]0;owned\x07", False), (status["keyId"] + ".20261121T000000Z", True)):
        vm.metadata[names.STATUS_KEY] = json.dumps({**status, "rekey": rekey})
        facts = explain(KEY, vm, SETTINGS, entry_exists=True, now=world.clock.now).facts
        assert ("key rotation" in facts) == shown, rekey


def test_the_rotation_policy_asks_for_a_new_key_and_certifies_it_as_soon_as_it_arrives(plugin_ca, logs):
    world = World(plugin_ca, settings=replace(SETTINGS, key_rotation_renewals=3))
    old_key = world.join()
    for renewal in (2, 3, 4):
        world.clock.now += 13 * HOUR
        assert world.reconcile(read_agent=False).verb == "renewed"
        status = world.status()
        assert status["keyCerts"] == str(renewal)
        assert (names.REKEY_KEY in world.metadata()) == (renewal == 4), renewal  # 4 would exceed 3: ask
        world.compute.confirm(KEY)  # the VM's watcher installs each renewal and reports it
    token = world.metadata()[names.REKEY_KEY]
    assert world.status()["rekey"] == token and token.startswith(world.status()["keyId"] + ".")
    # Joined: the reason says it briefly (it is listed with every VM); `meshjoin explain` gives the remedy.
    assert "asked the VM for a new key" in world.status()["reason"]
    assert RUN_AGENT_REMEDY not in world.status()["reason"]
    facts = explain(KEY, world.compute.vms[KEY], SETTINGS, entry_exists=True, now=world.clock.now).facts
    assert facts["key rotation"].startswith("requested") and RUN_AGENT_REMEDY in facts["key rotation"]
    assert pki.chain_key_id(world.chain()) == pki.key_id(old_key.public_key())  # the old key still served

    # The sweep looks for the new key while the request is pending (one guest-attribute read, nothing else).
    plan = plan_sweep(world.sweeper.inventory(), SETTINGS, plugin_ca.fingerprint, world.clock.now)
    assert [(a.kind, a.reason[:30]) for a in plan.actions] == [(JOIN, "a key rotation was requested: ")]
    assert world.reconcile(read_agent=False).verb == "refreshed"  # records the report of the installed renewal
    writes = world.compute.writes
    assert world.reconcile(read_agent=False).verb == "unchanged" and world.compute.writes == writes
    assert not world.status().get("warnings")

    new_key = world.compute.hand_in_key(KEY)  # the agent acted on the token: a new key, a CSR, a nudge
    outcome = world.reconcile()
    status = world.status()
    assert (outcome.verb, status["state"]) == ("rotated", "joined"), "a rotation keeps the VM in traffic"
    assert status["keyId"] == pki.key_id(new_key.public_key()) and status["keyCerts"] == "1"
    assert pki.chain_key_id(world.chain()) == status["keyId"]
    assert world.metadata()[names.REKEY_KEY] == token  # acted on: not asked again
    assert plan_sweep(world.sweeper.inventory(), SETTINGS, plugin_ca.fingerprint, world.clock.now).actions == []
    assert set(world.secrets.calls) <= {"secrets.list"} and world.entries() == [ENTRY]
    leak_scan(world, logs, [old_key, new_key])


def test_a_rotation_policy_of_zero_never_asks(plugin_ca):
    world = World(plugin_ca, settings=replace(SETTINGS, key_rotation_renewals=0))
    world.join()
    for _ in range(6):
        world.clock.now += 13 * HOUR
        assert world.reconcile().verb == "renewed"
    assert names.REKEY_KEY not in world.metadata() and world.status()["keyCerts"] == "7"


def test_a_ca_rotation_re_issues_for_the_same_key(plugin_ca, tmp_path):
    from meshjoin_sandbox.ca import make_plugin_ca

    world = World(plugin_ca)
    vm_key = world.join()
    first = world.status()
    make_plugin_ca(tmp_path, root_name="next root")
    files = [(tmp_path / n).read_bytes() for n in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")]
    rotated = PluginCa(pki.load_ca_bundle(*files), ("v2", "v2", "v2", "v2"), "ca-fingerprint-2")
    world.secrets.ca = rotated
    plan = plan_sweep(world.sweeper.inventory(), SETTINGS, rotated.fingerprint, NOW)
    assert [a.kind for a in plan.actions] == ["reissue"]
    assert world.reconcile(read_agent=False).verb == "reissued"
    status = world.status()
    assert status["caFingerprint"] == "ca-fingerprint-2" and status["keyId"] == first["keyId"]
    assert status["state"] == "joined" and status["certSerial"] != first["certSerial"]
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    leaf(world.chain()).verify_directly_issued_by(rotated.bundle.ca_cert)  # signed by the new CA
    assert set(world.secrets.calls) <= {"secrets.list"}  # the planning's listing, no write


def test_an_identity_change_re_certifies_with_the_new_identity_and_asks_for_a_new_key(plugin_ca):
    world = World(plugin_ca)
    vm_key = world.join()
    vm = world.compute.vms[KEY]
    world.compute.vms[KEY] = Vm(KEY, vm.instance_id, {"mesh": "join", "mesh-namespace": "apps"}, dict(vm.metadata),
                                vm.metadata_fingerprint, vm.network_ip, "other@my-project.iam.gserviceaccount.com")
    outcome = world.reconcile()
    status = world.status()
    assert outcome.state == "waiting" and world.entries() == [], "a new identity is confirmed afresh"
    assert pki.cert_info(world.chain()).spiffe_id == "spiffe://cluster.local/ns/apps/sa/web"
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    assert world.metadata()[names.REKEY_KEY] == status["rekey"]  # the key served the old identity: rotate it
    world.compute.confirm(KEY)
    assert world.reconcile().state == "joined"


def test_a_renewal_without_a_csr_signs_nothing_and_says_so(plugin_ca, logs):
    world = World(plugin_ca)
    world.join()
    chain = world.chain()
    world.compute.guest[KEY].pop(names.CSR_ATTRIBUTE)  # the agent's CSR is gone
    world.clock.now = NOW + 13 * HOUR
    outcome = world.reconcile()
    assert outcome.state == "joined" and world.chain() == chain
    assert "nothing was certified" in world.status()["reason"] and "expires at" in world.status()["reason"]
    assert "nothing was certified" in logs.getvalue()


# --- races, clones, reads ---------------------------------------------------------------------------------------


def test_a_412_race_rereads_and_converges_on_one_certificate_for_the_vms_key(plugin_ca):
    class RacingCompute(FakeCompute):
        races = 2

        def set_metadata(self, vm, items, remove=frozenset()):
            if self.races:
                self.races -= 1
                current = self.vms[vm.key]  # the owner (or another pass) wrote meanwhile
                self.vms[vm.key] = replace(current, metadata={**current.metadata, "owner": str(self.races)},
                                           metadata_fingerprint=f"owner-{self.races}")
                raise StaleFingerprint(str(vm.key))
            super().set_metadata(vm, items, remove)

    world = World(plugin_ca)
    assert world.reconcile().verb == "bootstrapped"
    world.compute = RacingCompute(world.compute.vms)
    world.reconciler.compute = world.compute
    vm_key = world.compute.hand_in_key(KEY)
    assert world.reconcile().verb == "delivered"
    assert world.compute.races == 0 and world.metadata()["owner"] == "0"  # the owner's item kept
    assert pki.chain_key_id(world.chain()) == pki.key_id(vm_key.public_key())
    assert [item for item, _ in world.compute.received].count(names.CERT_CHAIN_KEY) == 1
    assert world.secrets.calls == []


def test_a_clone_never_inherits_the_copied_status_certificate_or_key(plugin_ca, logs):
    from meshjoin.model import VmKey

    world = World(plugin_ca)
    source_key = world.join()
    clone = VmKey(KEY.project, KEY.zone, "vm-1-clone")
    copied = world.compute.vms[KEY]  # a machine image copies the metadata: status, chain and all
    world.compute.vms[clone] = Vm(clone, "9999", dict(copied.labels), dict(copied.metadata), "fp-c",
                                  "10.128.0.8", copied.service_account)
    world.compute.vm_keys[clone] = source_key  # the copied disk's key.pem, kept by a hostile owner
    world.compute.guest[clone] = {names.CSR_ATTRIBUTE: csr_pem(source_key), "cert-serial": world.status()["certSerial"],
                                  "sidecar": "running"}
    outcome = world.reconcile(clone)
    status = world.status(clone)
    assert outcome.state == "waiting" and "copied from" in status["reason"]
    assert names.CERT_CHAIN_KEY not in world.metadata(clone) and "keyId" not in status
    assert world.entries() == [ENTRY], "the clone has no entry; the source keeps its own"

    fresh = world.compute.hand_in_key(clone)  # agent 3 saw the instance id change: a fresh key
    assert world.reconcile(clone).verb == "delivered"
    assert pki.chain_key_id(world.chain(clone)) == pki.key_id(fresh.public_key()) != world.status()["keyId"]
    assert world.reconcile(clone).state == "waiting"  # the copied report names the source's serial
    world.compute.confirm(clone)
    assert world.reconcile(clone).state == "joined"
    assert world.status()["state"] == "joined" and world.reconcile().verb == "unchanged"  # the source untouched
    leak_scan(world, logs, [source_key, fresh])


def test_guest_attributes_are_read_only_when_needed(plugin_ca):
    world = World(plugin_ca)
    world.join()
    reads = world.compute.guest_reads
    world.reconcile(read_agent=False)  # the sweep's pass over a joined VM with nothing due
    assert world.compute.guest_reads == reads
    world.reconcile()  # an event (the agent's nudge) always reads
    assert world.compute.guest_reads == reads + 1
    world.clock.now = NOW + 13 * HOUR
    world.reconcile(read_agent=False)  # a renewal is due: the CSR is needed
    assert world.compute.guest_reads == reads + 2


def test_a_multi_line_csr_round_trips_through_the_guest_attributes_answer():
    pem = csr_pem(ec_key())
    body = json.loads(json.dumps({"queryPath": "meshjoin/", "queryValue": {"items": [
        {"namespace": "meshjoin", "key": "csr", "value": pem}]}}))
    assert guest_items(body)["csr"] == pem and pki.parse_csr(guest_items(body)["csr"], "ecdsa-p256")


# --- the legacy migration ---------------------------------------------------------------------------------------


def legacy_world(ca) -> World:
    secret = f"projects/1/secrets/{names.secret_id(KEY, 'meshjoin-vm')}/versions/3"
    status = {"state": "joined", "identity": SPIFFE, "instanceId": "4242", "confirmedSerial": "abc",
              "certSerial": "abc", "secret": secret, "previousSecret": secret[:-1] + "2", "workloadEntry": ENTRY,
              "caFingerprint": "ca-fingerprint", "certNotBefore": "2026-11-21T00:00:00Z",
              "certNotAfter": "2026-11-22T00:00:00Z"}
    metadata = {names.SECRET_KEY: secret, names.STATUS_KEY: json.dumps(status),
                names.CLUSTER_ENV_KEY: "PROV_CERT=/etc/certs\n", names.STARTUP_SCRIPT_KEY: names.STARTUP_SCRIPT_MARKER
                + "\nagent 2\n", names.ROOT_CERT_KEY: plugin_ca_root(ca), names.GUEST_ATTRIBUTES_KEY: "TRUE"}
    world = World(ca, vms={KEY: vm_with({"mesh": "join"}, metadata)}, legacy=[KEY])
    world.compute.guest[KEY] = {"agent-version": "2", "cert-serial": "ABC", "sidecar": "running"}
    return world


def plugin_ca_root(ca) -> str:
    return ca.bundle.root_certs_pem


def test_legacy_vm_keeps_its_secret_until_agent_3_is_confirmed_then_the_secret_goes(plugin_ca, logs):
    world = legacy_world(plugin_ca)
    before = world.metadata()
    outcome = world.reconcile()
    status, after = world.status(), world.metadata()
    assert outcome.verb == "migrating" and status["state"] == "joined" and "migrating" in status["reason"]
    assert after[names.STARTUP_SCRIPT_KEY] == bootstrap.startup_script()  # agent 3, run at the next boot
    assert after[names.SECRET_KEY] == before[names.SECRET_KEY]  # agent 2 keeps serving from its secret
    assert after[names.CLUSTER_ENV_KEY] == before[names.CLUSTER_ENV_KEY]  # ... with its own configuration
    assert "secret" not in status and "previousSecret" not in status
    assert world.entries() == [ENTRY] and world.secrets.legacy == {KEY} and world.secrets.calls == []
    assert world.reconcile().verb == "unchanged"  # a fixed point until the VM reboots

    vm_key = world.compute.hand_in_key(KEY)  # the VM rebooted: agent 3 made its key
    assert world.reconcile().verb == "delivered"
    assert world.status()["state"] == "joined" and names.SECRET_KEY in world.metadata()
    # Agent 3's configuration: this VM's lines now (the shared ones, FILE_MOUNTED_CERTS among them, are in
    # project metadata), and agent 2's copies of the shared items go.
    own = world.metadata()[names.CLUSTER_ENV_KEY]
    assert own != before[names.CLUSTER_ENV_KEY] and "SERVICE_ACCOUNT=" in own and "FILE_MOUNTED_CERTS" not in own
    assert "FILE_MOUNTED_CERTS=true" in bootstrap.mesh_env(world.reconciler.settings)
    assert world.secrets.legacy == {KEY}, "kept until agent 3 confirms"

    world.compute.confirm(KEY)
    outcome = world.reconcile()
    status = world.status()
    assert outcome.verb == "migrated" and status["state"] == "joined"
    assert status["confirmedSerial"] == status["certSerial"] and names.SECRET_KEY not in world.metadata()
    assert world.secrets.legacy == set() and world.secrets.calls == [f"secrets.delete {KEY}"]
    assert world.reconcile().verb == "unchanged" and world.entries() == [ENTRY]
    assert plan_sweep(Inventory({KEY: world.compute.vms[KEY]}, [], [], {}), SETTINGS, plugin_ca.fingerprint,
                      NOW).notes == []
    leak_scan(world, logs, [vm_key])


def test_a_legacy_item_copied_onto_a_clone_is_removed_and_no_secret_is_deleted(plugin_ca):
    world = legacy_world(plugin_ca)
    vm = world.compute.vms[KEY]
    world.compute.vms[KEY] = replace(vm, instance_id="5555")  # the status names another instance
    world.reconcile()
    assert names.SECRET_KEY not in world.metadata() and world.status()["state"] == "waiting"
    assert world.secrets.calls == [] and world.entries() == []


def test_the_sweep_prunes_the_secret_a_migration_left_behind(plugin_ca):
    world = World(plugin_ca, legacy=[KEY])
    world.join()  # a VM without `meshjoin-secret`, but its old secret is still listed
    summary = world.sweeper.sweep()
    assert summary.counts["pruned"] == 1 and world.secrets.legacy == set()
    assert world.secrets.calls == ["secrets.list", f"secrets.delete {KEY}"]


@pytest.mark.parametrize("plant", [
    lambda key: private_pem(key),
    lambda key: secrets_of(key)[1],  # the DER, base64
    lambda key: format(key.private_numbers().private_value, "x"),
], ids=["PEM", "DER base64", "private scalar"])
def test_the_leak_scan_finds_a_planted_key(plugin_ca, logs, plant):
    """The scan above can fail: a key written anywhere it looks is found."""
    world = World(plugin_ca)
    vm_key = world.join()
    world.compute.received.append(("planted", "x" + plant(vm_key) + "y"))
    with pytest.raises(AssertionError):
        leak_scan(world, logs, [vm_key])


def test_join_force_re_certifies_the_current_key(plugin_ca):
    """`meshjoin join --force`: a fresh certificate for the key the VM holds, whatever is due."""
    world = World(plugin_ca)
    vm_key = world.join()
    first = world.status()
    assert world.reconcile(force_new_cert=True).verb == "renewed"
    status = world.status()
    assert status["keyId"] == first["keyId"] == pki.key_id(vm_key.public_key()) and status["keyCerts"] == "2"
    assert status["certSerial"] != first["certSerial"] and status["state"] == "joined"


@pytest.mark.parametrize("args, forced", [([], False), (["--force"], True)])
def test_the_cli_join_forces_only_when_asked(monkeypatch, args, forced):
    from click.testing import CliRunner

    from meshjoin import cli
    from meshjoin.reconcile import Outcome

    asked = {}

    class Runtime:
        settings = SETTINGS

        class reconciler:
            @staticmethod
            def reconcile(key, **kwargs):
                asked.update(kwargs, key=key)
                return Outcome("unchanged", "ok", state="joined")

    monkeypatch.setattr(cli, "_runtime", lambda: Runtime)
    logger = logging.getLogger("meshjoin")  # the CLI configures meshjoin's logger: put it back afterwards
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        result = CliRunner().invoke(cli.cli, ["join", "vm-1", "--zone", KEY.zone, *args])
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
    assert result.exit_code == 0 and asked == {"force_new_cert": forced, "key": KEY}


def test_a_vm_still_serving_an_older_certificate_is_warned_about_and_the_warning_clears(plugin_ca):
    """istio-agent never renews by itself: a VM whose watcher stopped keeps an older certificate, so the
    status says so (with the remedy) as soon as a pass reads the VM's report, and no longer once it caught up."""
    world = World(plugin_ca)
    world.join()
    first = world.status()
    world.clock.now = NOW + 13 * HOUR
    world.sweeper.sweep()  # renewed: a new certificate in metadata, which the VM's watcher does not install
    renewed = world.status()
    assert renewed["certSerial"] != first["certSerial"] and not renewed.get("warnings")
    world.reconcile()  # the next event pass reads the report, which still names the first certificate
    warnings = world.status().get("warnings") or []
    assert any(f"serves certificate {first['certSerial']}, not {renewed['certSerial']}" in w and
               "meshjoin-watch.service" in w for w in warnings), warnings
    assert world.status()["state"] == "joined"
    world.compute.confirm(KEY)  # the watcher installed the renewal and reported it
    world.reconcile()
    assert not world.status().get("warnings")


# --- the entry-name check: once per first delivery (issue 16) ------------------------------------------------


class CountingKube(FakeKube):
    def __init__(self):
        super().__init__()
        self.entry_gets = 0

    def get(self, kind, namespace, name):
        self.entry_gets += kind == "WorkloadEntry"
        return super().get(kind, namespace, name)


def test_the_entry_name_is_checked_once_per_first_delivery(plugin_ca):
    world = World(plugin_ca)
    world.kube = world.reconciler.kube = CountingKube()
    assert world.reconcile().verb == "bootstrapped" and world.kube.entry_gets == 1  # the bootstrap pass checks
    world.compute.hand_in_key(KEY)
    assert world.reconcile().verb == "delivered" and world.kube.entry_gets == 1  # its `waiting` status says so
    world.compute.confirm(KEY)
    assert world.reconcile().verb == "registered" and world.entries() == [ENTRY]


def test_a_status_forged_waiting_skips_the_check_but_never_lets_a_foreign_entry_be_replaced(plugin_ca):
    """The VM's owner forges `waiting` for their own VM and identity, so the certificate pass does not look at
    the entry name first: they get a certificate for the identity policy grants them anyway, and the entry that
    someone else made at their entry's name stays untouched (the registration refuses it)."""
    namespace, name = ENTRY.split("/")
    foreign = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": name, "namespace": namespace, "labels": {"app": "someone-else"}},
               "spec": {"address": "10.0.0.1"}}
    forged = json.dumps({"state": "waiting", "instanceId": "4242", "identity": SPIFFE})
    world = World(plugin_ca, vms={KEY: vm_with({"mesh": "join"}, {names.STATUS_KEY: forged})})
    world.kube = world.reconciler.kube = CountingKube()
    world.kube._store(foreign)
    entry_key = ("WorkloadEntry", namespace, name)
    before = json.dumps(world.kube.objects[entry_key], sort_keys=True)
    world.compute.hand_in_key(KEY)
    assert world.reconcile().verb == "delivered" and world.kube.entry_gets == 0
    world.compute.confirm(KEY)
    outcome = world.reconcile()
    assert (outcome.verb, world.status()["state"]) == ("failed", "error")
    assert "not managed by meshjoin" in outcome.reason
    assert json.dumps(world.kube.objects[entry_key], sort_keys=True) == before  # the foreign entry, untouched


def test_without_a_waiting_status_for_this_vm_and_identity_a_foreign_entry_stops_the_delivery(plugin_ca):
    namespace, name = ENTRY.split("/")
    foreign = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": name, "namespace": namespace}, "spec": {"address": "10.0.0.1"}}
    forged = json.dumps({"state": "waiting", "instanceId": "another-instance", "identity": SPIFFE})
    world = World(plugin_ca, vms={KEY: vm_with({"mesh": "join"}, {names.STATUS_KEY: forged})})
    world.kube._store(foreign)
    world.compute.hand_in_key(KEY)
    outcome = world.reconcile()
    assert outcome.verb == "failed" and names.CERT_CHAIN_KEY not in world.metadata()


def test_a_vm_without_any_meshjoin_item_is_bootstrapped_without_reading_its_guest_attributes(plugin_ca):
    world = World(plugin_ca)
    world.compute.hand_in_key(KEY)  # whatever is there already (no agent 3 writes before the bootstrap)
    assert world.reconcile().verb == "bootstrapped" and world.compute.guest_reads == 0
    assert names.CERT_CHAIN_KEY not in world.metadata()
    assert world.reconcile().verb == "delivered" and world.compute.guest_reads == 1  # from the next pass on

    # Any meshjoin item, the status of a VM that left included, means the VM was bootstrapped before: read.
    left = json.dumps({"state": "left", "reason": "the label mesh=join was removed"})
    world = World(plugin_ca, vms={KEY: vm_with({"mesh": "join"}, {names.STATUS_KEY: left})})
    world.compute.hand_in_key(KEY)
    assert world.reconcile().verb == "delivered" and world.compute.guest_reads == 1
