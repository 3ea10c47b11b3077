"""Fixtures of the agent's harness (harness.py): a metadata server, a CA playing meshjoin, a VM's throwaway root."""

from __future__ import annotations

import os
import shutil

import pytest

from .harness import Issuer, MetadataServer, Vm, csr_public_key, deployment

TOOLS = ("bash", "curl", "python3", "openssl", "flock", "sha256sum", "cmp", "install", "stat", "awk", "sed")


@pytest.fixture(autouse=True, scope="session")
def host_can_run_the_agent():
    """The agent runs as root (it chowns its key to istio-proxy and checks that directories are root's) with a few
    stock tools. Skipped without them, except in CI, where a runner that is not root or lacks a tool is a broken
    image and fails."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    reason = (f"not installed: {', '.join(missing)}" if missing else
              "the VM agent runs as root (chown to istio-proxy); run tests/agent as root" if os.geteuid() != 0
              else "")
    if reason and os.environ.get("CI"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def server():
    served = MetadataServer()
    yield served
    served.close()


@pytest.fixture
def vm(tmp_path, server, issuer) -> Vm:
    """A VM meshjoin admitted: its bootstrap items in instance metadata, the deployment's in project metadata."""
    deployment(server, issuer)
    return Vm(tmp_path, server)


@pytest.fixture
def bare_vm(tmp_path, server) -> Vm:
    """A VM with empty metadata (a test fills what it needs)."""
    return Vm(tmp_path, server)


def join(vm: Vm, server: MetadataServer, issuer: Issuer, serial: int | None = None) -> None:
    """One boot that ends serving: meshjoin (the issuer) answers the CSR as soon as it is written, and the boot's
    wait for a metadata change picks the certificate up (as on GCE when the reconcile is quick)."""
    server.on_guest_write = lambda key, value: key == "csr" and server.set_instance(
        meshjoin_cert_chain=issuer.sign(csr_public_key(value), serial=serial))
    run = vm.boot(MESHJOIN_WAIT_SECONDS="20")
    server.on_guest_write = None
    assert run.returncode == 0, run.journal
    assert vm.sidecar_active() and vm.file("etc/certs/cert-chain.pem").exists(), run.journal


@pytest.fixture
def joined_vm(vm, server, issuer) -> Vm:
    """A VM serving meshjoin's certificate for its own key, its sidecar running."""
    join(vm, server, issuer)
    return vm
