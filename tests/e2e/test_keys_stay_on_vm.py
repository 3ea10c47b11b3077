"""Issue 14 through the whole sandbox: every VM makes its own key, meshjoin certifies only what policy
grants, and no private key exists outside the VMs' fake roots.

The hostile cases are what a VM owner can do with their own VMs: run one on the project's default
compute account, clone a joined VM (its metadata, and with it its disk), or change a VM's service
account. None of them yields another VM's key or a certificate for an identity the VM's current
account is not bound to.
"""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .conftest import account, private_key_leaks, verify_vm_identity, wait_for

DEFAULT_COMPUTE_ACCOUNT = "123456789012-compute@developer.gserviceaccount.com"  # the sandbox's project number
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
TRUST = "cluster.local"


def spiffe(namespace: str, ksa: str) -> str:
    return f"spiffe://{TRUST}/ns/{namespace}/sa/{ksa}"


def create(sandbox, name: str, service_account: str, *labels: str) -> None:
    sandbox.meshjoin("sandbox", "create-vm", name, "--service-account", service_account, "--label", "mesh=join",
                     *[arg for label in labels for arg in ("--label", label)])


def leaf(chain_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem.encode())[0]


def public_key_of(pem: str) -> bytes:
    return serialization.load_pem_private_key(pem.encode(), password=None).public_key().public_bytes(*SPKI)


def certified_key(chain_pem: str) -> bytes:
    return leaf(chain_pem).public_key().public_bytes(*SPKI)


def guest_csr(sandbox, name: str) -> str:
    """The CSR the VM's agent wrote (guest attribute meshjoin/csr), as the operator reads it with gcloud."""
    result = sandbox.run("gcloud", "compute", "instances", "get-guest-attributes", name, f"--zone={sandbox.zone}",
                         "--query-path=meshjoin/csr", "--format=json", check=False)
    if result.returncode != 0:
        return ""
    items = json.loads(result.stdout or "[]")
    return next((i.get("value", "") for i in items if i.get("key") == "csr"), "")


def root_pem(sandbox) -> str:
    return sandbox.ca_file("root-cert.pem").read_text()


@pytest.fixture(scope="module")
def source(sandbox) -> dict:
    """A joined VM whose key others would like: hk-src, apps/hk."""
    create(sandbox, "hk-src", account("hk-src"))
    status = sandbox.join_confirmed("hk-src", timeout=60)
    certs = sandbox.certs("hk-src")
    verify_vm_identity(certs, spiffe("apps", "hk"), root_pem(sandbox))
    return {"status": status, "certs": certs, "metadata": sandbox.metadata("hk-src")}


def test_a_joined_vm_holds_its_own_key_and_a_certificate_of_its_granted_identity(sandbox, source):
    status, certs = source["status"], source["certs"]
    assert status["identity"] == spiffe("apps", "hk")
    # The key never left the VM: meshjoin's metadata holds only the certificate for it (public).
    metadata = source["metadata"]
    assert certified_key(metadata["meshjoin-cert-chain"]) == public_key_of(certs["key.pem"])
    assert format(leaf(certs["cert-chain.pem"]).serial_number, "x") == status["certSerial"]
    assert "meshjoin-secret" not in metadata
    mode = (sandbox.vm_root("hk-src") / "etc" / "certs" / "key.pem").stat().st_mode & 0o777
    assert mode == 0o600
    # Secret Manager holds the plug-in CA and nothing per VM.
    secrets = sandbox.run("gcloud", "secrets", "list", "--format=value(name)").stdout.split()
    assert sorted(s.rsplit("/", 1)[-1] for s in secrets) == sorted(sandbox.config["ca_secrets"])


def test_a_vm_on_the_default_compute_account_gets_nothing(sandbox, source):
    create(sandbox, "hk-default", DEFAULT_COMPUTE_ACCOUNT)
    wait_for(lambda: sandbox.logged("hk-default", "denied"), timeout=30, what="hk-default denied")
    # Its owner runs the agent anyway: it has no bootstrap, so it sends nothing and gets nothing.
    sandbox.meshjoin("sandbox", "run-startup", "hk-default", check=False)
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "hk-default"})
    wait_for(lambda: len(sandbox.logged("hk-default", "denied")) >= 2, timeout=30, what="the nudge denied too")
    metadata = sandbox.metadata("hk-default")
    assert not any(key.startswith("meshjoin-") for key in metadata), metadata
    certs = sandbox.certs("hk-default")
    assert not certs["cert-chain.pem"] and not certs["key.pem"]
    assert not sandbox.entries_for("hk-default")


def test_a_clone_with_the_disk_makes_its_own_key_and_never_gets_the_source_key_certified(sandbox, source):
    """A machine-image clone carries the source's metadata (its status and certificate) and its disk
    (its key.pem, like any file). The clone's agent sees another instance id and makes a new key;
    meshjoin certifies the clone's key, for the identity the clone's account is bound to."""
    sandbox.meshjoin("sandbox", "clone", "hk-src", "hk-clone", "--with-disk")
    status = sandbox.join_confirmed("hk-clone", timeout=60)
    clone_certs = sandbox.certs("hk-clone")
    assert public_key_of(clone_certs["key.pem"]) != public_key_of(source["certs"]["key.pem"])
    verify_vm_identity(clone_certs, spiffe("apps", "hk"), root_pem(sandbox))  # same account, same identity
    assert status["instanceId"] != source["status"]["instanceId"]
    # Its own entry; the source's entry and certificate are untouched.
    assert len(sandbox.entries_for("hk-clone")) == 1
    assert sandbox.status("hk-src")["certSerial"] == source["status"]["certSerial"]
    assert sandbox.certs("hk-src")["key.pem"] == source["certs"]["key.pem"]


def test_a_clone_on_an_unbound_account_gets_no_certificate(sandbox, source):
    sandbox.meshjoin("sandbox", "clone", "hk-src", "hk-clone-other", "--service-account", account("hk-unbound"))
    wait_for(lambda: sandbox.logged("hk-clone-other", "denied"), timeout=30, what="the clone denied")
    # The clone booted with the copied agent, which makes its own key and asks anyway.
    wait_for(lambda: guest_csr(sandbox, "hk-clone-other"), timeout=60, what="the clone's CSR")
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "hk-clone-other"})
    wait_for(lambda: len(sandbox.logged("hk-clone-other", "denied")) >= 2, timeout=30, what="the nudge denied")
    metadata = sandbox.metadata("hk-clone-other")
    # meshjoin may not act as an unbound account, so it wrote nothing: what the clone holds is the
    # source's copied, public certificate, for the source's key, which the clone does not have.
    assert metadata.get("meshjoin-cert-chain") == source["metadata"]["meshjoin-cert-chain"]
    certs = sandbox.certs("hk-clone-other")
    for pem in (certs["key.pem"], certs["key.next.pem"]):
        if pem:
            assert public_key_of(pem) != certified_key(metadata["meshjoin-cert-chain"])
    assert not sandbox.entries_for("hk-clone-other")


def stop_change_account_start(sandbox, name: str, new_account: str) -> None:
    sandbox.meshjoin("sandbox", "stop", name)
    wait_for(lambda: (sandbox.vm(name) or {}).get("status") == "TERMINATED", timeout=30, what=f"{name} stopped")
    sandbox.run("gcloud", "compute", "instances", "set-service-account", name, f"--zone={sandbox.zone}",
                f"--service-account={new_account}", "--scopes=cloud-platform")
    sandbox.meshjoin("sandbox", "start", name)


def test_a_vm_whose_account_changes_is_certified_only_for_the_new_accounts_identity(sandbox, source):
    create(sandbox, "hk-move", account("hk-move"))
    before = sandbox.join_confirmed("hk-move", timeout=60)
    assert before["identity"] == spiffe("apps", "hk-move")
    stop_change_account_start(sandbox, "hk-move", account("hk-moved"))
    moved = spiffe("payments", "moved")
    after = wait_for(lambda: (s := sandbox.status("hk-move")).get("identity") == moved and
                     s.get("state") in ("waiting", "joined") and s, timeout=60, what="the new identity")
    if after["state"] == "waiting":
        sandbox.confirm("hk-move")
    after = wait_for(lambda: (s := sandbox.status("hk-move")).get("state") == "joined" and s, timeout=60,
                     what="hk-move joined again")
    assert after["identity"] == moved
    assert spiffe("apps", "hk-move") not in sandbox.metadata("hk-move").get("meshjoin-cert-chain", "")
    verify_vm_identity(wait_for(lambda: (c := sandbox.certs("hk-move"))["cert-chain.pem"] and
                                format(leaf(c["cert-chain.pem"]).serial_number, "x") == after["certSerial"] and c,
                                timeout=60, what="the new certificate on the VM"), moved, root_pem(sandbox))
    entries = sandbox.entries_for("hk-move")
    assert [e["metadata"]["namespace"] for e in entries] == ["payments"]


def test_a_vm_moved_to_an_unbound_account_gets_no_further_certificate(sandbox, source):
    create(sandbox, "hk-drop", account("hk-drop"))
    before = sandbox.join_confirmed("hk-drop", timeout=60)
    stop_change_account_start(sandbox, "hk-drop", account("hk-unbound"))
    wait_for(lambda: not sandbox.entries_for("hk-drop"), timeout=60, what="hk-drop's entry removed")
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "hk-drop"})
    wait_for(lambda: sandbox.logged("hk-drop", "denied"), timeout=30, what="hk-drop denied")
    # meshjoin may not act as the new account: it wrote nothing after the stop, in particular no new
    # certificate (the status is the `stopped` one written while the VM still ran as the bound account).
    status = sandbox.status("hk-drop")
    assert status["state"] == "stopped" and status.get("certSerial") in (None, before["certSerial"])
    chain = sandbox.metadata("hk-drop").get("meshjoin-cert-chain", "")
    assert not chain or format(leaf(chain).serial_number, "x") == before["certSerial"]


@pytest.mark.timeout(300)
def test_zz_no_private_key_outside_the_vms(sandbox, source):
    """After the joins, clones and account changes above, every key is where it was made."""
    names = ["hk-src", "hk-default", "hk-clone", "hk-clone-other", "hk-move", "hk-drop"]
    present = [n for n in names if sandbox.vm(n)]
    assert private_key_leaks(sandbox, present) == []
    # And no VM's key.pem was ever copied to another VM by meshjoin: every key is distinct, except the
    # one the disk clone started from (which its agent replaced: see above).
    keys = {}
    for name in present:
        pem = sandbox.certs(name)["key.pem"]
        if pem:
            keys.setdefault(public_key_of(pem), []).append(name)
    assert all(len(holders) == 1 for holders in keys.values()), json.dumps(list(keys.values()))


def test_the_scan_would_find_a_key_in_any_of_its_forms(sandbox, source):
    """The leak scan is only worth its green if it sees a key: plant the source VM's key in the forms
    a careless log line or payload would carry it, and each is found."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from .conftest import key_fingerprints

    pem = source["certs"]["key.pem"]
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    forms = key_fingerprints(der)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    import base64
    for planted in (pem, json.dumps({"key.pem": pem}), der.hex(), scalar.hex(), base64.b64encode(der).decode(),
                    base64.b64encode(scalar).decode()):
        assert any(form in planted for form in forms), planted[:40]
