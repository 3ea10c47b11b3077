"""The VM's key: made once, on the VM, 0600 and istio-proxy's, never printed or sent; only a CSR for it leaves the
VM (guest attribute meshjoin/csr), once per key; a new key only when meshjoin asks, the kind changes, or the disk
is another instance's."""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .harness import PROXY_UID, csr_public_key, mode_and_owner, spki


def key_id(public_key) -> str:
    """meshjoin-status's keyId: the first 16 hex digits of the SHA-256 of the SubjectPublicKeyInfo (DER)."""
    return hashlib.sha256(spki(public_key)).hexdigest()[:16]


def secret_lines(key_pem: bytes) -> list[str]:
    """The base64 lines of a private key's PEM: none of them may appear anywhere but the key file."""
    return [line for line in key_pem.decode().splitlines() if line and not line.startswith("-----")]


def assert_never_leaves_the_key_file(vm, server, key_pem: bytes, runs) -> None:
    lines = secret_lines(key_pem)
    said = [run.stdout + run.stderr + "\n".join(run.journal) for run in runs]
    sent = [r.path + r.body.decode(errors="replace") for r in server.state.requests]
    for line in lines:
        assert not any(line in text for text in said), "a private key line was printed or logged"
        assert not any(line in text for text in sent), "a private key line left the VM"
    key_files = {vm.file("etc/certs/key.pem"), vm.file("etc/certs/key.next.pem")}
    for path in vm.root.rglob("*"):
        if path.is_file() and path not in key_files:
            assert not any(line.encode() in path.read_bytes() for line in lines), path
    assert list(vm.tmp.iterdir()) == []  # the run's work directory is gone (it never held a private key)


def test_the_key_is_made_once_on_the_vm_0600_istio_proxy_and_never_printed(vm, server):
    first = vm.boot()
    assert first.returncode == 0, first.stderr
    key = vm.key_pem("key.next.pem")
    assert b"PRIVATE KEY" in key and not vm.file("etc/certs/key.pem").exists()
    assert mode_and_owner(vm.file("etc/certs/key.next.pem")) == (0o600, PROXY_UID, PROXY_UID)
    assert mode_and_owner(vm.file("etc/certs")) == (0o755, 0, 0)  # root's alone: nobody else can swap a key in
    assert isinstance(vm.public_key("key.next.pem"), ec.EllipticCurvePublicKey)
    assert vm.public_key("key.next.pem").curve.name == "secp256r1"
    made = f"notice: made a new ecdsa-p256 key {key_id(vm.public_key('key.next.pem'))} on this VM"
    assert sum(line.startswith(made) for line in first.journal) == 1

    again = vm.boot()  # a reboot before meshjoin answered: the same key, not a second one
    assert again.returncode == 0
    assert vm.key_pem("key.next.pem") == key
    assert not any("made a new" in line for line in again.journal)
    assert [p.name for p in vm.file("etc/certs").iterdir() if p.name.startswith(".key")] == []
    assert_never_leaves_the_key_file(vm, server, key, [first, again])


def test_the_csr_goes_to_guest_attributes_once_per_key(vm, server):
    run = vm.boot()
    csr_pem = server.csr()
    assert csr_pem is not None and csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid  # signed with the key it names: proof the VM holds it
    assert spki(csr.public_key()) == spki(vm.public_key("key.next.pem"))
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshjoin-agent"
    wanted = key_id(csr.public_key())
    assert vm.state("csr-key-id") == wanted
    assert (f"notice: asked meshjoin to certify key {wanted} ({vm.root}/etc/certs/key.next.pem): CSR in guest "
            "attribute meshjoin/csr") in run.journal
    put = server.requests("PUT", "/guest-attributes/meshjoin/csr")
    assert len(put) == 1 and put[0].headers["Metadata-Flavor"] == "Google"

    assert vm.boot().returncode == 0  # guest attributes outlive reboots: not written again for the same key
    assert server.guest_writes().count("csr") == 1


def test_guest_writes_are_spaced_and_one_refused_as_too_many_is_tried_again(vm, server):
    """GCE allows bursts of 3 guest-attribute writes a second: each write waits 0.4 s first, and a 429 is tried
    again after a pause (the sleep stub records the pauses instead of sleeping)."""
    server.state.guest_refusals = [429]
    run = vm.boot()
    assert run.returncode == 0
    assert server.guest_writes()[:2] == ["csr", "csr"] and server.csr() is not None
    pauses = vm.calls("sleep")
    assert pauses[:3] == ["0.4", "1", "0.4"]  # spaced, refused, paused, tried again
    assert pauses.count("0.4") == len(server.guest_writes())


def test_without_guest_attributes_the_boot_says_why_and_does_not_wait(vm, server):
    server.state.guest_enabled = False
    run = vm.boot(MESHJOIN_WAIT_SECONDS="30")
    assert run.returncode == 0
    assert any(line.startswith("warning: ask meshjoin to certify this VM's key (guest attribute meshjoin/csr): could "
                               "not write it (the metadata server answered 403") and
               "Remedy: enable guest attributes" in line for line in run.journal), run.journal
    wanted = key_id(vm.public_key("key.next.pem"))
    assert f"warning: not waiting for a certificate: the CSR for key {wanted} could not be written" in run.journal
    assert vm.state("csr-key-id") is None  # not recorded as asked: the next run writes it
    assert not any("attributes/?" in r.path and "wait_for_change" in r.path for r in server.state.requests)

    server.state.guest_enabled = True
    assert vm.boot().returncode == 0
    assert spki(csr_public_key(server.csr())) == spki(vm.public_key("key.next.pem"))
    assert vm.state("csr-key-id") == wanted


def test_a_rekey_makes_a_new_pending_key_once_and_keeps_serving_the_old_one(joined_vm, server):
    vm = joined_vm
    serving = vm.key_pem()
    server.set_instance(meshjoin_rekey="rotate-1")
    run = vm.watch_once()
    assert run.returncode == 0
    assert any(line.startswith("notice: made a new ecdsa-p256 key") and "meshjoin asked for a new key (rekey "
               "rotate-1)" in line for line in run.journal), run.journal
    assert vm.key_pem() == serving and vm.file("etc/certs/cert-chain.pem").exists()  # served until the new one
    pending = vm.key_pem("key.next.pem")
    assert spki(csr_public_key(server.csr())) == spki(vm.public_key("key.next.pem"))
    assert vm.state("rekey") == "rotate-1" and server.guest_writes().count("csr") == 1

    server.set_instance(meshjoin_hosts="10.128.0.10 istiod.istio-system.svc\n")  # another change, same token
    assert vm.watch_once().returncode == 0
    assert vm.key_pem("key.next.pem") == pending and server.guest_writes().count("csr") == 1


def test_rsa_2048_when_meshjoin_asks_for_it_and_a_new_key_when_the_kind_changes(vm, server):
    server.set_project(meshjoin_key_algorithm="rsa-2048")
    vm.boot()
    key = vm.public_key("key.next.pem")
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    server.set_project(meshjoin_key_algorithm="ecdsa-p256")
    run = vm.boot()
    assert any("meshjoin certifies ecdsa-p256 keys, and key.next.pem is rsa-2048" in line for line in run.journal)
    assert isinstance(vm.public_key("key.next.pem"), ec.EllipticCurvePublicKey)


def test_a_disk_of_another_instance_drops_its_keys_and_makes_its_own(joined_vm, server):
    """A clone (or a recreated VM on the same disk) must not keep serving, or certify, the original's key."""
    vm = joined_vm
    original = vm.key_pem()
    server.state.instance_id = "4815162343"
    server.set_instance(meshjoin_cert_chain=None)
    run = vm.boot()
    assert run.returncode == 0
    assert any(re.match(r"warning: this disk's keys were made on instance 4815162342, but this VM is instance "
                        r"4815162343", line) for line in run.journal), run.journal
    assert not vm.file("etc/certs/key.pem").exists() and not vm.file("etc/certs/cert-chain.pem").exists()
    assert vm.key_pem("key.next.pem") != original
    assert spki(csr_public_key(server.csr())) == spki(vm.public_key("key.next.pem"))
    assert vm.state("instance-id") == "4815162343"
