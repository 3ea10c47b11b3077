"""Installing meshjoin's certificate: only a chain whose leaf certifies a key this VM holds (the pending key, or
the key in use for a renewal), and only one that verifies against meshjoin's root; anything else is refused with
a warning and the files in place are kept."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from .harness import PROXY_UID, Issuer, csr_public_key, mode_and_owner, spki

SERIAL = 0x0A1B2C3D4E5F60718293A4B5C6D7E8F9  # openssl prints it with a leading zero; meshjoin records it without


def test_one_boot_ends_serving_when_meshjoin_answers_while_it_waits(vm, server, issuer):
    """The boot waits (wait_for_change on the instance's ETag) for meshjoin's answer to its CSR, installs it, and
    starts the sidecar: the pending key becomes key.pem."""
    server.on_guest_write = lambda key, value: key == "csr" and server.set_instance(
        meshjoin_cert_chain=issuer.sign(csr_public_key(value), serial=SERIAL))
    run = vm.boot(MESHJOIN_WAIT_SECONDS="20")
    assert run.returncode == 0, run.stderr
    assert any("wait_for_change=true" in r.path for r in server.requests("GET"))
    assert not vm.file("etc/certs/key.next.pem").exists()
    assert spki(vm.public_key()) == spki(csr_public_key(server.csr()))
    assert vm.file("etc/certs/cert-chain.pem").read_text() == server.state.instance["meshjoin-cert-chain"]
    assert vm.file("etc/certs/root-cert.pem").read_text() == issuer.root_pem
    for name, mode in (("key.pem", 0o600), ("cert-chain.pem", 0o644), ("root-cert.pem", 0o644)):
        assert mode_and_owner(vm.file(f"etc/certs/{name}")) == (mode, PROXY_UID, PROXY_UID), name
    assert vm.state("cert-serial") == "a1b2c3d4e5f60718293a4b5c6d7e8f9"
    assert any(line.startswith("notice: installed certificate a1b2c3d4e5f60718293a4b5c6d7e8f9 for key ") and
               line.endswith("(the new key is now key.pem)") for line in run.journal), run.journal
    assert "restart istio.service" in vm.calls("systemctl") and vm.sidecar_active()
    assert run.journal[-1] == ("notice: boot done: this VM is a mesh workload (certificate "
                               "a1b2c3d4e5f60718293a4b5c6d7e8f9)")


def test_a_renewal_for_the_key_in_use_replaces_the_chain_without_restarting_the_sidecar(joined_vm, server, issuer):
    vm = joined_vm
    public = vm.public_key()
    key, calls = vm.key_pem(), len(vm.calls("systemctl"))
    renewal = issuer.sign(public, serial=SERIAL)
    server.set_instance(meshjoin_cert_chain=renewal)
    run = vm.watch_once()
    assert run.returncode == 0
    assert vm.file("etc/certs/cert-chain.pem").read_text() == renewal and vm.key_pem() == key
    assert any(line.endswith("(a renewal of the key in use)") for line in run.journal), run.journal
    # istio-agent watches the file-mounted certificate: a renewal needs no restart.
    changes = [call for call in vm.calls("systemctl")[calls:] if not call.startswith("is-")]  # the report asks
    assert changes == ["enable istio.service", "start istio.service"]
    assert vm.state("cert-serial") == "a1b2c3d4e5f60718293a4b5c6d7e8f9"


def refused(vm, server, chain: str, said: str) -> None:
    """The chain is not installed, the pending key stays pending, no sidecar starts, and the run says why."""
    server.set_instance(meshjoin_cert_chain=chain)
    pending = vm.key_pem("key.next.pem")
    run = vm.watch_once()
    assert run.returncode == 0
    assert any(line.startswith(f"warning: install the workload certificate: {said}") for line in run.journal), \
        run.journal
    assert not vm.file("etc/certs/cert-chain.pem").exists() and not vm.file("etc/certs/key.pem").exists()
    assert vm.key_pem("key.next.pem") == pending and vm.state("cert-serial") is None
    assert not vm.sidecar_active()


def test_a_chain_for_a_key_the_vm_does_not_hold_is_refused(booted_vm, server, issuer):
    vm = booted_vm
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    refused(vm, server, issuer.sign(stranger), "meshjoin-cert-chain certifies key ")
    assert any("which this VM does not hold" in line for line in vm.journal())


def test_a_chain_that_does_not_verify_against_meshjoins_root_is_refused(booted_vm, server):
    vm, public = booted_vm, csr_public_key(server.csr())
    refused(vm, server, Issuer("another").sign(public), "the certificate for key ")
    assert any("does not verify against meshjoin-root-cert" in line for line in vm.journal())


def test_an_expired_certificate_is_refused(booted_vm, server, issuer):
    vm, public = booted_vm, csr_public_key(server.csr())
    refused(vm, server, issuer.sign(public, expired=True), "the certificate for key ")


def test_a_chain_that_is_not_a_certificate_is_refused(booted_vm, server):
    vm = booted_vm
    refused(vm, server, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "metadata item meshjoin-cert-chain holds no readable certificate")


def test_a_refused_chain_never_replaces_a_certificate_in_use(joined_vm, server):
    vm = joined_vm
    public = vm.public_key()
    chain, key = vm.file("etc/certs/cert-chain.pem").read_bytes(), vm.key_pem()
    server.set_instance(meshjoin_cert_chain=Issuer("another").sign(public))
    assert vm.watch_once().returncode == 0
    assert vm.file("etc/certs/cert-chain.pem").read_bytes() == chain and vm.key_pem() == key
