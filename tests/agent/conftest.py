"""Fixtures of the agent's harness (harness.py): a metadata server, a CA playing meshjoin, a VM's throwaway root."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

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


def _template(base, issuer, make) -> tuple:
    """A VM brought to a state for real (`make(vm, server, issuer)`), kept as a template: its root, the stubs'
    records and its metadata server's state, without the requests that got it there."""
    server = MetadataServer()
    try:
        deployment(server, issuer)
        vm = Vm(base, server)
        make(vm, server, issuer)
        state = copy.deepcopy(server.state)
    finally:
        server.close()
    state.requests.clear()
    state.published.clear()
    return base, state, server.host


def _copy(template, tmp_path, server) -> Vm:
    """A copy of a template VM (owners, modes and times kept by `cp -a`), its metadata server in the same state."""
    base, state, host = template
    server.state = copy.deepcopy(state)
    for items in (server.state.project, server.state.instance):  # the nudge goes to this test's server
        items.update({k: v.replace(host, server.host) for k, v in items.items() if host in v})
    vm = Vm(tmp_path, server)
    for part in ("root", "log"):
        shutil.rmtree(tmp_path / part)
        subprocess.run(["cp", "-a", str(base / part), str(tmp_path / part)], check=True)
    return vm


def _boot(vm, server, issuer) -> None:
    run = vm.boot()
    assert run.returncode == 0 and server.csr() is not None, run.journal


@pytest.fixture(scope="session")
def booted_template(tmp_path_factory, issuer, host_can_run_the_agent):
    return _template(tmp_path_factory.mktemp("booted"), issuer, _boot)


@pytest.fixture(scope="session")
def joined_template(tmp_path_factory, issuer, host_can_run_the_agent):
    """One join for real per test process (two converges, about 430 processes); each test gets a copy."""
    return _template(tmp_path_factory.mktemp("joined"), issuer, join)


@pytest.fixture
def booted_vm(tmp_path, server, booted_template) -> Vm:
    """A VM after its first boot: a pending key, its CSR in guest attributes, no certificate yet."""
    return _copy(booted_template, tmp_path, server)


@pytest.fixture
def joined_vm(tmp_path, server, joined_template) -> Vm:
    """A VM serving meshjoin's certificate for its own key, its sidecar running."""
    return _copy(joined_template, tmp_path, server)
