"""The VM agent (agent 3, fetched and checked by the startup-script stub) run for real against the sandbox.

Most tests let the sandbox boot the agent in a VM's own fake root: its startup script at boot, then the
watcher (meshjoin-watch.service), which the sandbox runs as systemd would. They play meshjoin's part with a
TEST-SIDE ISSUER: read the VM's CSR from its guest attributes through the Compute API, sign its public key
with the sandbox's plug-in CA files, and write `meshjoin-cert-chain` and the other bootstrap items into the
VM's metadata as the operator. The VMs are not labelled mesh=join and are created without an audit event,
so meshjoin itself never touches them: these tests hold whatever the product's reconcile does.
The FakeVm tests run the script by hand (as root) in a throw-away root with the sandbox's recording shims:
the package checksum gate and istio-proxy's symlinks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from functools import cached_property, partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.cloud import compute_v1

from meshjoin import bootstrap
from meshjoin.model import Identity, VmKey
from meshjoin.settings import Settings
from meshjoin_sandbox.cli import SandboxClients
from meshjoin_sandbox.guest import PROXY_UID, guest_env, install_shims, prepare_root

from .conftest import wait_for

IN_CI = bool(os.environ.get("CI"))
SIDECAR_VERSION = "1.24.0-meshjoin-test"
AGENT = "usr/local/sbin/meshjoin-agent"
NO_EVENT = [("x-sandbox-no-event", "1")]  # no audit entry: meshjoin never hears of these VMs
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
TOPIC = "projects/meshjoin-sandbox/topics/agent-test-nudges"


def need(*tools: str) -> None:
    """Skip without a tool, except in CI, where a missing tool is a broken image and must fail."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing and not IN_CI:
        pytest.skip(f"not installed: {', '.join(missing)}")
    assert not missing, f"CI image lacks {missing}"


def need_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the VM agent runs as root (chown to istio-proxy); CI must run the suite as root")
        pytest.skip("the VM agent runs as root (chown); run the suite as root")


# --- meshjoin's part, played by the test ------------------------------------------------------------------------


class Issuer:
    """Signs public keys with the sandbox's plug-in CA files, as meshjoin would (SAN = the SPIFFE id only)."""

    def __init__(self, sandbox):
        self.ca_cert = x509.load_pem_x509_certificate(sandbox.ca_file("ca-cert.pem").read_bytes())
        self.ca_key = serialization.load_pem_private_key(sandbox.ca_file("ca-key.pem").read_bytes(), None)
        self.ca_chain = sandbox.ca_file("cert-chain.pem").read_text()
        self.root = sandbox.ca_file("root-cert.pem").read_text()

    def sign(self, public_key, spiffe: str = "spiffe://cluster.local/ns/apps/sa/agent-test",
             expired: bool = False) -> tuple[str, str]:
        """(chain PEM: leaf then the CA's chain, serial as meshjoin records it)."""
        now = datetime.now(timezone.utc) - (timedelta(hours=2) if expired else timedelta())
        serial = x509.random_serial_number()
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca_cert.subject)
                .public_key(public_key).serial_number(serial)
                .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        return leaf.public_bytes(serialization.Encoding.PEM).decode() + self.ca_chain, format(serial, "x")


class Nudges:
    """A stand-in Pub/Sub endpoint recording what the agents publish (meshjoin's real topic stays quiet)."""

    def __init__(self):
        self.published: list[tuple[str, dict]] = []
        nudges = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                nudges.published.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"messageIds": ["1"]}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def for_vm(self, name: str) -> list[dict]:
        messages = [json.loads(base64.b64decode(m["data"])) for path, body in self.published
                    if path == f"/v1/{TOPIC}:publish" for m in body["messages"]]
        return [m for m in messages if m.get("instance") == name]


@pytest.fixture(scope="module")
def nudges():
    server = Nudges()
    yield server
    server.server.shutdown()


def bootstrap_items(sandbox, nudges: Nudges, script: str | None) -> dict[str, str]:
    items = {
        "meshjoin-cluster-env": "ISTIO_NAMESPACE=apps\nSERVICE_ACCOUNT=agent-test\nFILE_MOUNTED_CERTS=true\n",
        "meshjoin-mesh-config": json.dumps({"defaultConfig": {"discoveryAddress": "istiod.istio-system.svc:15012"}}),
        "meshjoin-root-cert": Issuer(sandbox).root,
        "meshjoin-hosts": "10.128.15.250 istiod.istio-system.svc\n",
        "meshjoin-events-topic": TOPIC,
        "meshjoin-pubsub-endpoint": nudges.endpoint,
        "enable-guest-attributes": "TRUE",
    }
    if script is not None:
        items["startup-script"] = script
    return items


class Vm:
    """One sandbox VM as its operator sees it (Compute API) and as a person on it would (its fake root)."""

    def __init__(self, sandbox, name: str):
        self.sandbox, self.name = sandbox, name
        self.clients = SandboxClients(sandbox.state_dir)
        self.instances, self.ops = self.clients.compute()
        self.project, self.zone = sandbox.project, sandbox.zone
        self.issuer = Issuer(sandbox)
        self.keys_seen: set[str] = set()  # base64 bodies of every private key this VM held, for leak scans

    def create(self, items: dict[str, str]) -> "Vm":
        body = compute_v1.Instance(
            name=self.name, machine_type=f"zones/{self.zone}/machineTypes/e2-small",
            metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]),
            network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
            service_accounts=[compute_v1.ServiceAccount(email=f"{self.name}@{self.project}.iam.gserviceaccount.com",
                                                        scopes=["https://www.googleapis.com/auth/cloud-platform"])])
        op = self.instances.insert_unary(project=self.project, zone=self.zone, instance_resource=body,
                                         metadata=NO_EVENT)
        self.clients.wait(self.ops, op, self.zone)
        return self

    def delete(self) -> None:
        op = self.instances.delete_unary(project=self.project, zone=self.zone, instance=self.name, metadata=NO_EVENT)
        self.clients.wait(self.ops, op, self.zone)

    def get(self) -> compute_v1.Instance:
        return self.instances.get(project=self.project, zone=self.zone, instance=self.name)

    def items(self) -> dict[str, str]:
        return {i.key: i.value for i in self.get().metadata.items}

    def set_items(self, **changes: str | None) -> None:
        """The operator's setMetadata: keys with `_` for `-`; None removes the item."""
        instance = self.get()
        items = {i.key: i.value for i in instance.metadata.items}
        for key, value in changes.items():
            key = key.replace("_", "-")
            if value is None:
                items.pop(key, None)
            else:
                items[key] = value
        op = self.instances.set_metadata_unary(
            project=self.project, zone=self.zone, instance=self.name, metadata=NO_EVENT,
            metadata_resource=compute_v1.Metadata(fingerprint=instance.metadata.fingerprint, items=[
                compute_v1.Items(key=k, value=v) for k, v in items.items()]))
        self.clients.wait(self.ops, op, self.zone)

    def guest(self) -> dict[str, str]:
        """Every guest attribute of the VM, as meshjoin reads them (instances.getGuestAttributes)."""
        try:
            answer = self.instances.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
                project=self.project, zone=self.zone, instance=self.name, query_path="meshjoin/"))
        except Exception as exc:  # 404 while the namespace is empty
            if "404" in str(exc) or "not found" in str(exc).lower():
                return {}
            raise
        return {item.key: item.value for item in answer.query_value.items}

    def csr(self) -> x509.CertificateSigningRequest | None:
        pem = self.guest().get("csr")
        return x509.load_pem_x509_csr(pem.encode()) if pem else None

    def wait_csr(self, other_than: bytes | None = None) -> x509.CertificateSigningRequest:
        """The VM's CSR (one for a key other than `other_than`, DER SPKI, when given), checked as meshjoin would."""
        def fresh():
            csr = self.csr()
            return csr if csr is not None and spki(csr.public_key()) != other_than else None
        csr = wait_for(fresh, timeout=30, what=f"a CSR from {self.name}")
        assert csr.is_signature_valid  # proof of possession
        return csr

    def issue(self, public_key) -> tuple[str, str]:
        chain, serial = self.issuer.sign(public_key)
        self.set_items(meshjoin_cert_chain=chain)
        return chain, serial

    def reboot(self) -> None:
        self.sandbox.meshjoin("sandbox", "reboot", self.name)

    # --- inside the VM ---------------------------------------------------------------------------------------

    @cached_property
    def root(self) -> Path:
        return Path(self.sandbox.meshjoin("sandbox", "vm-root", self.name).stdout.strip())

    def file(self, path: str) -> Path:
        return self.root / path

    def serial(self) -> str:
        path = self.root.parent / "serial.log"
        return path.read_text() if path.exists() else ""

    def journal(self) -> str:
        path = self.root.parent / "log" / "journal"
        return path.read_text() if path.exists() else ""

    def systemctl(self) -> list[str]:
        path = self.root.parent / "log" / "systemctl"
        calls = path.read_text().splitlines() if path.exists() else []
        return [c for c in calls if not c.startswith(("is-active", "is-failed"))]

    def boots_done(self) -> int:
        return self.serial().count("startup-script exit status")

    def key(self, name: str = "key.pem"):
        pem = self.file(f"etc/certs/{name}").read_bytes()
        self.keys_seen.add(key_body(pem))
        return serialization.load_pem_private_key(pem, None)

    def watcher_pids(self) -> list[int]:
        """Main processes (each leads its own session, as systemd starts them) of `meshjoin-agent watch`."""
        program = str(self.file(AGENT))
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if program.encode() in cmdline and b"watch" in cmdline and session_leader(proc):
                    found.append(int(proc.name))
        return found


def session_leader(proc: Path) -> bool:
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[3] == proc.name  # state, ppid, pgrp, session


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed grandchild may wait for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def spki(public_key) -> bytes:
    return public_key.public_bytes(*SPKI)


def key_body(pem: bytes) -> str:
    """The base64 body of a PEM private key (what a leak would show, with or without its armour)."""
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


def leaf_of(chain_pem: str | bytes) -> x509.Certificate:
    data = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
    return x509.load_pem_x509_certificate(data)


def mode_and_owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mode & 0o777, st.st_uid


def tree(root: Path) -> dict[str, tuple]:
    """Every file with what a rewrite would change: content, mode, owner, inode, mtime (bookkeeping aside)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name in ("etag", "lock") or path.parent.name == "stage":
            continue
        st = path.stat()
        out[str(path.relative_to(root))] = (path.read_bytes(), st.st_mode, st.st_uid, st.st_ino, st.st_mtime_ns)
    return out


def assert_no_private_key_outside_certs(vm: Vm, nudges: Nudges | None = None) -> None:
    """No private key (armour or body) in the serial log, the shims' logs (journal...), the guest attributes,
    the metadata, what the agent published, or any file of the fake root but /etc/certs/key*.pem."""
    assert vm.keys_seen, "the test never looked at a key: nothing to search for"
    texts = {"serial.log": vm.serial(), "guest attributes": json.dumps(vm.guest()), "metadata": json.dumps(vm.items())}
    for path in (vm.root.parent / "log").rglob("*"):
        if path.is_file():
            texts[f"log/{path.name}"] = path.read_text(errors="replace")
    for path in vm.root.rglob("*"):
        relative = str(path.relative_to(vm.root))
        if path.is_file() and not path.is_symlink() and not re.fullmatch(r"etc/certs/key(\.next)?\.pem", relative):
            texts[relative] = path.read_text(errors="replace")
    if nudges is not None:
        texts["published"] = json.dumps(nudges.published)
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        for body in vm.keys_seen:
            assert body[:48] not in text.replace("\n", ""), where


@pytest.fixture(scope="module")
def script() -> str:
    return bootstrap.startup_script()


@pytest.fixture
def booted(sandbox, nudges, script):
    """A VM whose agent booted and waits for its first certificate (a pending key, its CSR written)."""
    need("openssl", "curl", "python3", "flock", "sha256sum")
    need_root()

    made: list[Vm] = []

    def make(name: str, **extra: str) -> Vm:
        vm = Vm(sandbox, name).create({**bootstrap_items(sandbox, nudges, script),
                                       **{k.replace("_", "-"): v for k, v in extra.items()}})
        made.append(vm)
        vm.wait_csr()
        return vm
    yield make
    for vm in made:  # its watcher ends with it: later tests share the sandbox's two cores
        vm.delete()


def joined(vm: Vm) -> tuple[str, str]:
    """Issue the pending key's certificate and wait for the boot run to install it and end."""
    csr = vm.wait_csr()
    chain, serial = vm.issue(csr.public_key())
    wait_for(lambda: vm.boots_done() >= 1, timeout=30, what=f"{vm.name}'s boot run")
    assert "startup-script exit status 0" in vm.serial(), vm.serial()
    wait_for(lambda: vm.guest().get("cert-serial") == serial, timeout=20, what=f"{vm.name} reports {serial}")
    return chain, serial


# --- the script as text -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [bootstrap.startup_stub(), bootstrap.agent_text()], ids=["stub", "agent"])
def test_the_stub_and_the_agent_are_shellcheck_clean(tmp_path, text):
    need("shellcheck")
    path = tmp_path / "startup-script"
    path.write_text(text)
    result = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_script_has_no_secret_manager_and_makes_keys_only_with_openssl():
    script = bootstrap.agent_text()  # what the stub runs
    assert "secretmanager" not in script.lower() and "SECRETMANAGER" not in script
    assert "openssl genpkey" in script and "openssl req -new" in script and "openssl x509" in script
    assert "ec_paramgen_curve:P-256" in script and "rsa_keygen_bits:2048" in script


@pytest.mark.timeout(300)
def test_metadata_values_cannot_add_lines_to_the_script_or_cluster_env(sandbox):
    """The script is the same text for every VM; a value with quotes or newlines is denied, not rendered."""
    hostile = (("inject-nl", "http:8080\nEVIL=1"), ("inject-q", "http:8080,x'$(reboot)':1"),
               ("inject-dq", 'http:"8080"\n'))
    for name, ports in hostile:  # all created first, then awaited: the events are handled side by side
        sandbox.meshjoin("sandbox", "create-vm", name, "--label", "mesh=join", "--metadata", f"mesh-ports={ports}",
                         "--service-account", f"{name}@meshjoin-sandbox.iam.gserviceaccount.com")
    sandbox.meshjoin("sandbox", "create-vm", "inject-ok", "--label", "mesh=join", "--label", "mesh-namespace=apps",
                     "--label", "mesh-version=v1", "--metadata", "mesh-ports=http:8080",
                     "--service-account", "inject-ok@meshjoin-sandbox.iam.gserviceaccount.com")
    for name, _ in hostile:
        status = wait_for(lambda: (s := sandbox.status(name)).get("state") == "denied" and s, timeout=60,
                          what=f"{name} denied")
        assert "mesh-ports" in status["reason"]
        metadata = sandbox.metadata(name)
        assert "meshjoin-cluster-env" not in metadata and "startup-script" not in metadata
    wait_for(lambda: "startup-script" in sandbox.metadata("inject-ok"), timeout=60, what="inject-ok's bootstrap")
    metadata = sandbox.metadata("inject-ok")
    assert metadata["startup-script"] == bootstrap.startup_stub()  # the same stub for every VM, no value in it
    expected_keys = bootstrap.vm_env(  # the VM's own lines (the shared ones are in project metadata)
        VmKey("p", "z", "i"), Identity("ns", "sa", "app", "v1", {"http": 1}),
        Settings(project="p", cluster="projects/p/locations/l/clusters/c")).count("\n")
    env_lines = metadata["meshjoin-cluster-env"].splitlines()
    assert len(env_lines) == expected_keys
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line) for line in env_lines), env_lines


# --- the stub: the agent's text lives once, in project metadata ----------------------------------------------


def set_project_item(sandbox, key: str, value: str | None) -> None:
    """The project's common metadata, as Terraform's google_compute_project_metadata_item sets one key."""
    clients = SandboxClients(sandbox.state_dir)
    opts = {"api_endpoint": clients.cfg.url("compute")}
    projects = compute_v1.ProjectsClient(transport="rest", client_options=opts, credentials=clients._credentials())
    operations = compute_v1.GlobalOperationsClient(transport="rest", client_options=opts,
                                                   credentials=clients._credentials())
    current = projects.get(project=sandbox.project).common_instance_metadata
    items = {i.key: i.value for i in current.items if i.key != key}
    if value is not None:
        items[key] = value
    op = projects.set_common_instance_metadata_unary(project=sandbox.project, metadata_resource=compute_v1.Metadata(
        fingerprint=current.fingerprint, items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]))
    operations.wait(project=sandbox.project, operation=op.name)


def project_items(sandbox) -> dict[str, str]:
    """The project's common metadata (what agent.tf wrote at `up`: the agent and the shared items)."""
    clients = SandboxClients(sandbox.state_dir)
    projects = compute_v1.ProjectsClient(transport="rest", client_options={"api_endpoint": clients.cfg.url("compute")},
                                         credentials=clients._credentials())
    return {i.key: i.value for i in projects.get(project=sandbox.project).common_instance_metadata.items}


EVIL = '#!/bin/bash\ntouch "${MESHJOIN_ROOT:-}/pwned"\n'


def test_the_stub_runs_the_projects_agent_not_an_instance_item_of_the_same_name(sandbox, nudges, script):
    """The VM owner may set an instance item named like the agent's: the stub reads the project's, explicitly."""
    need("openssl", "curl", "python3", "flock", "sha256sum")
    need_root()
    vm = Vm(sandbox, "stub-shadow").create({**bootstrap_items(sandbox, nudges, script),
                                            bootstrap.agent_metadata_key(): EVIL})
    try:
        vm.wait_csr()  # the real agent ran: it made its key and handed in its CSR
        assert not vm.file("pwned").exists()
        assert vm.file(AGENT).read_text() == bootstrap.agent_text()  # it installed itself, byte for byte
    finally:
        vm.delete()


@pytest.mark.parametrize("published", [True, False], ids=["tampered", "missing"])
def test_the_stub_never_runs_text_that_is_not_its_pinned_sha256(sandbox, nudges, published):
    """A stub pinning S runs nothing when project metadata holds other text under S's key, or nothing at all:
    one line on the serial console, a failed run, no agent, no key."""
    pinned = "0" * 16 + hashlib.sha256(b"an agent nobody published").hexdigest()[16:]
    key = "meshjoin-agent-" + pinned[:16]
    stub = bootstrap.startup_stub().replace(bootstrap.agent_sha256(), pinned)
    if published:
        set_project_item(sandbox, key, EVIL)  # text whose SHA-256 is not the pinned one
    name = f"stub-{'tampered' if published else 'missing'}"
    vm = Vm(sandbox, name).create(bootstrap_items(sandbox, nudges, stub))
    try:
        wait_for(lambda: vm.boots_done() >= 1, timeout=30, what=f"{name}'s boot run")
        serial = vm.serial()
        assert f"meshjoin: no agent of SHA-256 {pinned} in project metadata: not run" in serial, serial
        assert "startup-script exit status 1" in serial
        if not published:
            assert "404" in serial  # curl names the missing item's answer
        assert not vm.file("pwned").exists() and not vm.file(AGENT).exists()
        assert not vm.file("etc/certs/key.next.pem").exists() and vm.guest().get("csr") is None
    finally:
        vm.delete()
        if published:
            set_project_item(sandbox, key, None)


def test_vm_metadata_verb_serves_one_vms_own_view(sandbox):
    Vm(sandbox, "agent-md").create({"enable-guest-attributes": "TRUE"})
    host = sandbox.meshjoin("sandbox", "vm-metadata", "agent-md").stdout.strip()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", host)
    assert sandbox.meshjoin("sandbox", "vm-metadata", "agent-md").stdout.strip() == host  # started once
    missing = sandbox.meshjoin("sandbox", "vm-metadata", "no-such-vm", check=False)
    assert missing.returncode != 0 and "no-such-vm" in missing.stderr


# --- the agent at boot and in its watcher, in the sandbox's own guests ---------------------------------------------


def test_boot_makes_the_key_on_the_vm_and_one_boot_run_ends_serving_meshjoins_certificate(booted, nudges):
    vm = booted("ag-boot")
    # Waiting: a pending key, made here, 0600 and istio-proxy's, in root's own /etc/certs; nothing served yet.
    pending = vm.key("key.next.pem")
    assert mode_and_owner(vm.file("etc/certs/key.next.pem")) == (0o600, PROXY_UID)
    assert mode_and_owner(vm.file("etc/certs")) == (0o755, 0)
    assert not vm.file("etc/certs/key.pem").exists() and not vm.file("etc/certs/cert-chain.pem").exists()
    assert isinstance(pending, ec.EllipticCurvePrivateKey) and pending.curve.name == "secp256r1"
    csr = vm.csr()
    assert spki(csr.public_key()) == spki(pending.public_key())
    assert vm.boots_done() == 0  # the boot run is still waiting for meshjoin
    wait_for(lambda: {"project": vm.project, "zone": vm.zone, "instance": vm.name} in nudges.for_vm(vm.name),
             what="the nudge after the CSR")

    chain, serial = joined(vm)
    key = vm.key()
    assert spki(key.public_key()) == spki(pending.public_key()) == spki(csr.public_key())
    assert spki(leaf_of(vm.file("etc/certs/cert-chain.pem").read_bytes()).public_key()) == spki(key.public_key())
    assert vm.file("etc/certs/cert-chain.pem").read_text() == chain
    assert vm.file("etc/certs/root-cert.pem").read_text() == vm.issuer.root
    assert not vm.file("etc/certs/key.next.pem").exists()
    for name, mode in (("key.pem", 0o600), ("cert-chain.pem", 0o644), ("root-cert.pem", 0o644)):
        assert mode_and_owner(vm.file(f"etc/certs/{name}")) == (mode, PROXY_UID), name
    report = vm.guest()
    assert (report["cert-serial"], report["sidecar"], report["agent-version"]) == (serial, "running",
                                                                                   bootstrap.AGENT_VERSION)
    assert vm.file("var/lib/meshjoin/instance-id").read_text().strip() == str(vm.get().id)
    journal = vm.journal()
    assert f"installed certificate {serial}" in journal and "boot done: this VM is a mesh workload" in journal
    assert "restart istio.service" in vm.systemctl() or "start istio.service" in vm.systemctl()
    # This VM's own lines (instance metadata), then the deployment's (project metadata: it has no copy of them).
    assert "meshjoin-mesh-env" not in vm.items()
    assert vm.file("var/lib/istio/envoy/cluster.env").read_text() == \
        vm.items()["meshjoin-cluster-env"] + project_items(vm.sandbox)["meshjoin-mesh-env"]
    # The watcher runs in the background, as systemd runs meshjoin-watch.service.
    assert f"ExecStart=/{AGENT} watch" in vm.file("etc/systemd/system/meshjoin-watch.service").read_text()
    wait_for(lambda: len(vm.watcher_pids()) == 1, what="the watcher process")

    # Another run of the startup script changes nothing: same files (inodes, mtimes), same CSR, no new key.
    before, csr_before = tree(vm.root), vm.guest()["csr"]
    ran = vm.sandbox.meshjoin("sandbox", "run-startup", vm.name)
    assert "exited 0" in ran.stdout
    assert tree(vm.root) == before and vm.guest()["csr"] == csr_before
    assert_no_private_key_outside_certs(vm, nudges)


def test_the_watcher_installs_a_renewal_for_the_same_key_without_restarting_the_sidecar(booted, nudges):
    vm = booted("ag-renew")
    first_chain, first_serial = joined(vm)
    key_before = vm.file("etc/certs/key.pem").stat().st_ino, vm.file("etc/certs/key.pem").read_bytes()
    calls = len(vm.systemctl())

    chain, serial = vm.issue(vm.key().public_key())  # meshjoin re-certifies the current key
    assert serial != first_serial
    wait_for(lambda: vm.guest().get("cert-serial") == serial, timeout=20, what="the renewal reported")
    assert vm.file("etc/certs/cert-chain.pem").read_text() == chain
    assert (vm.file("etc/certs/key.pem").stat().st_ino, vm.file("etc/certs/key.pem").read_bytes()) == key_before
    assert "restart istio.service" not in vm.systemctl()[calls:]  # istio-agent re-reads the files itself
    assert vm.boots_done() == 1  # the watcher did it, not a boot
    assert f"installed certificate {serial} for key" in vm.journal() and "a renewal of the key in use" in vm.journal()
    assert_no_private_key_outside_certs(vm, nudges)


def test_a_rekey_makes_a_new_key_and_serves_the_old_one_until_its_certificate_arrives(booted, nudges):
    vm = booted("ag-rekey")
    chain, _ = joined(vm)
    old = vm.key()
    published = len(nudges.for_vm(vm.name))

    vm.set_items(meshjoin_rekey="rotate-1")
    csr = vm.wait_csr(other_than=spki(old.public_key()))
    pending = vm.key("key.next.pem")
    assert spki(csr.public_key()) == spki(pending.public_key()) != spki(old.public_key())
    assert mode_and_owner(vm.file("etc/certs/key.next.pem")) == (0o600, PROXY_UID)
    # Still serving the old key and its certificate until the new one is certified.
    assert spki(vm.key().public_key()) == spki(old.public_key())
    assert vm.file("etc/certs/cert-chain.pem").read_text() == chain
    wait_for(lambda: len(nudges.for_vm(vm.name)) > published, what="a nudge after the new CSR")

    new_chain, serial = vm.issue(csr.public_key())
    wait_for(lambda: vm.guest().get("cert-serial") == serial, timeout=20, what="the new key's certificate reported")
    assert spki(vm.key().public_key()) == spki(pending.public_key())
    assert not vm.file("etc/certs/key.next.pem").exists()
    assert vm.file("etc/certs/cert-chain.pem").read_text() == new_chain
    assert mode_and_owner(vm.file("etc/certs/key.pem")) == (0o600, PROXY_UID)

    # The same token again (any metadata change) makes no further key.
    vm.set_items(meshjoin_status='{"state": "joined"}')
    wait_for(lambda: vm.journal().count("converging: the metadata changed") >= 3, what="the watcher's converge")
    assert spki(vm.key().public_key()) == spki(pending.public_key()) and not vm.file("etc/certs/key.next.pem").exists()
    assert_no_private_key_outside_certs(vm, nudges)


def test_a_certificate_for_a_key_the_vm_does_not_hold_is_refused_and_the_files_stay(booted, nudges):
    vm = booted("ag-foreign")
    joined(vm)
    before = tree(vm.root / "etc" / "certs")
    stranger = ec.generate_private_key(ec.SECP256R1())
    _, serial = vm.issue(stranger.public_key())
    wait_for(lambda: "which this VM does not hold" in vm.journal(), what="the refusal in the journal")
    assert tree(vm.root / "etc" / "certs") == before
    assert vm.guest()["cert-serial"] != serial
    vm.key()
    assert_no_private_key_outside_certs(vm, nudges)


def test_a_clone_deletes_the_copied_key_and_makes_its_own(booted, sandbox, nudges):
    """A disk or machine image copies /etc/certs, the agent's state and the metadata; the clone has another
    instance id, so the copied key is deleted before anything else and a fresh one is certified."""
    source = booted("ag-source")
    source_chain, _ = joined(source)
    source_key = source.key()
    clone = Vm(sandbox, "ag-clone").create({"enable-guest-attributes": "TRUE"})  # no agent yet
    wait_for(lambda: "no startup scripts to run" in clone.serial(), what="the clone's first boot")
    subprocess.run(["cp", "-a", f"{source.root}/.", str(clone.root)], check=True)
    assert clone.file("etc/certs/key.pem").read_bytes() == source.file("etc/certs/key.pem").read_bytes()
    clone.set_items(**{k.replace("-", "_"): v for k, v in source.items().items()})  # the image's metadata too

    clone.reboot()
    csr = clone.wait_csr(other_than=spki(source_key.public_key()))
    journal = wait_for(lambda: "a clone, or a recreated VM" in (j := clone.journal()) and j, what="the clone noticed")
    assert f"this VM is instance {clone.get().id}" in journal
    fresh = clone.key("key.next.pem")
    assert spki(fresh.public_key()) == spki(csr.public_key()) != spki(source_key.public_key())
    assert not clone.file("etc/certs/key.pem").exists() and not clone.file("etc/certs/cert-chain.pem").exists()
    # The source's certificate, copied with the metadata, is refused (logged right after the CSR is written).
    wait_for(lambda: "which this VM does not hold" in clone.journal(), what="the copied certificate refused")

    _, serial = clone.issue(csr.public_key())
    wait_for(lambda: clone.guest().get("cert-serial") == serial, timeout=30, what="the clone's own certificate")
    assert spki(clone.key().public_key()) == spki(fresh.public_key())
    assert source.file("etc/certs/cert-chain.pem").read_text() == source_chain  # the source is untouched
    clone.keys_seen.add(key_body(source.file("etc/certs/key.pem").read_bytes()))
    assert_no_private_key_outside_certs(clone, nudges)
    clone.delete()
    assert clone.watcher_pids() == []


def test_a_vm_joined_by_an_earlier_agent_keeps_serving_until_its_own_key_is_certified(sandbox, nudges, script):
    """Agent 2 left a key that came from Secret Manager (no instance id recorded): agent 3 never certifies that
    key again. It keeps serving it, makes its own, and swaps once meshjoin certifies the new one."""
    need("openssl", "curl")
    need_root()
    vm = Vm(sandbox, "ag-legacy").create(bootstrap_items(sandbox, nudges, script=None))
    wait_for(lambda: "no startup scripts to run" in vm.serial(), what="the first boot")
    legacy_key = ec.generate_private_key(ec.SECP256R1())
    legacy_chain, _ = vm.issuer.sign(legacy_key.public_key())
    certs = vm.file("etc/certs")
    certs.mkdir(parents=True)
    os.chown(certs, PROXY_UID, PROXY_UID)  # as agent 2 left it, for istio-agent's own rotation
    (certs / "key.pem").write_bytes(legacy_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (certs / "cert-chain.pem").write_text(legacy_chain)
    vm.keys_seen.add(key_body((certs / "key.pem").read_bytes()))
    vm.set_items(startup_script=script, meshjoin_cert_chain=legacy_chain)

    vm.reboot()
    csr = vm.wait_csr()
    assert spki(csr.public_key()) != spki(legacy_key.public_key())
    wait_for(lambda: vm.boots_done() == 1, timeout=30, what="the boot run")  # no wait: the old key still serves
    assert "boot done: this VM is a mesh workload" in vm.journal()
    assert spki(vm.key().public_key()) == spki(legacy_key.public_key())
    assert spki(vm.key("key.next.pem").public_key()) == spki(csr.public_key())
    assert mode_and_owner(certs) == (0o755, 0)

    _, serial = vm.issue(csr.public_key())
    wait_for(lambda: vm.guest().get("cert-serial") == serial, timeout=20, what="the new key's certificate")
    assert spki(vm.key().public_key()) == spki(csr.public_key()) and not (certs / "key.next.pem").exists()
    assert_no_private_key_outside_certs(vm, nudges)
    vm.delete()


def test_without_guest_attributes_the_boot_does_not_wait_and_says_why(sandbox, nudges, script):
    need("openssl", "curl")
    need_root()
    vm = Vm(sandbox, "ag-noattr").create({**bootstrap_items(sandbox, nudges, script),
                                          "enable-guest-attributes": "FALSE"})
    wait_for(lambda: vm.boots_done() == 1, timeout=30, what="the boot run")
    journal = vm.journal()
    assert "could not write it (the metadata server answered 403" in journal and "enable-guest-attributes" in journal
    assert "not waiting for a certificate" in journal and "waiting up to" not in journal
    assert vm.file("etc/certs/key.next.pem").exists() and not vm.file("etc/certs/key.pem").exists()
    vm.delete()


def test_rsa_2048_when_meshjoin_asks_for_it_and_a_new_key_when_the_algorithm_changes(booted, nudges):
    vm = booted("ag-rsa", meshjoin_key_algorithm="rsa-2048")
    pending = vm.key("key.next.pem")
    assert isinstance(pending, rsa.RSAPrivateKey) and pending.key_size == 2048
    assert spki(vm.csr().public_key()) == spki(pending.public_key())
    joined(vm)
    vm.set_items(meshjoin_key_algorithm="ecdsa-p256")
    csr = vm.wait_csr(other_than=spki(pending.public_key()))
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert spki(vm.key().public_key()) == spki(pending.public_key())  # the RSA key serves meanwhile
    vm.key("key.next.pem")
    assert_no_private_key_outside_certs(vm, nudges)


def test_after_a_long_power_off_the_boot_waits_for_a_fresh_certificate_then_restarts_the_sidecar(booted, nudges):
    """The certificate expired while the VM was off (meshjoin renews no stopped VM): the boot run neither
    reinstalls the expired chain nor starts the sidecar from it; it waits, installs the renewal, restarts."""
    vm = booted("ag-off")
    joined(vm)
    key = vm.key()
    vm.sandbox.meshjoin("sandbox", "stop", vm.name)
    assert vm.watcher_pids() == []  # the VM is off: nothing of it runs
    expired, _ = vm.issuer.sign(key.public_key(), expired=True)
    vm.file("etc/certs/cert-chain.pem").write_text(expired)
    vm.set_items(meshjoin_cert_chain=expired)  # what meshjoin delivered last
    calls = len(vm.systemctl())

    vm.sandbox.meshjoin("sandbox", "start", vm.name)
    wait_for(lambda: vm.journal().count("waiting up to") == 2, timeout=30, what="the second boot waiting")
    assert "start istio.service" not in vm.systemctl()[calls:] and "restart istio.service" not in vm.systemctl()[calls:]
    _, serial = vm.issue(key.public_key())
    wait_for(lambda: vm.boots_done() == 2, timeout=30, what="the second boot run")
    assert vm.serial().count("startup-script exit status 0") == 2
    assert vm.guest()["cert-serial"] == serial
    assert "restart istio.service" in vm.systemctl()[calls:]
    assert spki(leaf_of(vm.file("etc/certs/cert-chain.pem").read_bytes()).public_key()) == spki(key.public_key())
    assert_no_private_key_outside_certs(vm, nudges)


def test_leaving_stops_the_sidecar_and_removes_the_keys(booted, nudges):
    vm = booted("ag-leave")
    joined(vm)
    vm.key()
    vm.set_items(meshjoin_rekey="leave-soon")
    vm.wait_csr(other_than=spki(vm.key().public_key()))
    vm.key("key.next.pem")
    vm.set_items(meshjoin_cluster_env=None)  # meshjoin withdrew the bootstrap
    wait_for(lambda: "left the mesh" in vm.journal(), what="the watcher leaving")
    for name in ("key.pem", "key.next.pem", "cert-chain.pem"):
        assert not vm.file(f"etc/certs/{name}").exists(), name
    assert vm.systemctl()[-2:] == ["stop istio.service", "disable istio.service"]
    report = vm.guest()
    assert report["sidecar"] == "stopped" and report["cert-serial"] == "" and "csr" not in report
    assert_no_private_key_outside_certs(vm, nudges)


# --- the script run by hand in a throw-away root: the package gate, istio-proxy's symlinks -------------------------


class Served:
    """A loopback HTTP server of a directory's files, counting the requests it answered."""

    def __init__(self, directory: Path):
        self.gets: list[str] = []
        served = self

        class Files(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                served.gets.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Files, directory=str(directory)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory) -> dict:
    """A tiny istio-sidecar.deb packed with dpkg-deb, served from loopback like the operator's mirror."""
    need("dpkg-deb")
    work = tmp_path_factory.mktemp("sidecar")
    package = work / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        f"Package: istio-sidecar\nVersion: {SIDECAR_VERSION}\nArchitecture: all\n"
        "Maintainer: meshjoin tests <tests@example.invalid>\nDescription: stand-in for Istio's VM sidecar\n")
    (package / "usr" / "local" / "bin").mkdir(parents=True)
    (package / "usr" / "local" / "bin" / "istio-start.sh").write_text("#!/bin/sh\nexit 0\n")
    served_dir = work / "www"
    served_dir.mkdir()
    deb = served_dir / "istio-sidecar.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)], check=True,
                   capture_output=True)
    served = Served(served_dir)
    yield {"url": f"{served.base}/istio-sidecar.deb", "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
           "served": served}
    served.server.shutdown()


class FakeVm:
    """A throw-away root plus the sandbox's shims; runs the agent as root against one VM's metadata server."""

    def __init__(self, base: Path, vm: Vm, sidecar: dict, script: str):
        self.vm = vm
        self.root, self.bin, self.log = base / "root", base / "bin", base / "log"
        prepare_root(self.root)
        install_shims(self.bin, self.log)  # the same shims the sandbox's guests run with (no systemd: recorded)
        self.script = base / "startup-script"
        self.script.write_text(script)
        host = vm.sandbox.meshjoin("sandbox", "vm-metadata", vm.name).stdout.strip()
        self.env = {**guest_env(self.root, self.bin, host), "MESHJOIN_SIDECAR_URL": sidecar["url"],
                    "MESHJOIN_SIDECAR_SHA256": sidecar["sha256"], "MESHJOIN_WAIT_SECONDS": "1"}

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=120)

    def watch_once(self, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.root / AGENT), "watch", "--once"], env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)

    def calls(self, tool: str) -> list[str]:
        path = self.log / tool
        return path.read_text().splitlines() if path.exists() else []

    def file(self, path: str) -> Path:
        return self.root / path


@pytest.fixture
def fake_vm(tmp_path, sandbox, sidecar, nudges, script):
    need("curl", "python3", "openssl", "flock", "sha256sum")
    need_root()

    made: list[Vm] = []

    def make(name: str) -> FakeVm:
        vm = Vm(sandbox, name).create(bootstrap_items(sandbox, nudges, script=None))  # the guest runs no agent
        made.append(vm)
        return FakeVm(tmp_path, vm, sidecar, script)
    yield make
    for vm in made:
        vm.delete()


def test_checksum_gate_refuses_a_package_that_does_not_match(fake_vm, sidecar):
    fake = fake_vm("ag-sum")
    result = fake.run(MESHJOIN_SIDECAR_SHA256="0" * 64)
    assert result.returncode == 1
    assert fake.calls("dpkg") == [] and not any("istio.service" in call for call in fake.calls("systemctl"))
    said = fake.calls("journal")[-1]
    assert f"checksum mismatch for {sidecar['url']}: expected sha256 {'0' * 64}, got {sidecar['sha256']}" in said
    assert "nothing was installed" in said and "Remedy:" in said
    unverified = fake.run(MESHJOIN_SIDECAR_SHA256="")
    assert unverified.returncode == 1 and fake.calls("dpkg") == []
    assert "refusing to install an unverified package" in fake.calls("journal")[-1]

    gets = len(sidecar["served"].gets)
    assert fake.run().returncode == 0  # the right checksum: installed once (the boot waits 1 s for a certificate)
    assert [call.split()[0] for call in fake.calls("dpkg")] == ["-i"]
    assert fake.run().returncode == 0
    assert len(fake.calls("dpkg")) == 1 and len(sidecar["served"].gets) == gets + 1  # no re-download
    assert f"installed istio-sidecar {SIDECAR_VERSION} (sha256 verified)" in "\n".join(fake.calls("journal"))


def plant_symlinks(fake: FakeVm, victim_dir: Path, victim_file: Path) -> list[str]:
    """What istio-proxy can do: in every directory it owns, swap each entry for a symlink to a root-owned target
    (files -> a root-only file, directories -> a root directory), and plant a symlink under each name the agent
    could create there. Done as root with istio-proxy owning the symlinks; only directories istio-proxy owns."""
    planted = []
    for directory in sorted({p for p in fake.root.rglob("*") if p.is_dir() and not p.is_symlink()} | {fake.root}):
        if directory.stat().st_uid != PROXY_UID:
            continue
        names = {p.name for p in directory.iterdir()} | {"key.pem", "key.next.pem", "cert-chain.pem",
                                                        "root-cert.pem", "envoy", "cluster.env"}
        for name in sorted(names):
            path = directory / name
            target = victim_dir if path.is_dir() and not path.is_symlink() else victim_file
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            path.symlink_to(target)
            os.lchown(path, PROXY_UID, PROXY_UID)
            planted.append(str(path.relative_to(fake.root)))
    return planted


def test_istio_proxy_symlinks_never_make_the_agent_touch_other_files(fake_vm):
    """Issue 15: istio-proxy plants symlinks where it can write (the sidecar package's postinst gives it
    /etc/certs and /var/lib/istio/envoy), then the agent converges. It must neither follow them (no chown,
    chmod, read or write of their targets: no CSR signed with a key it was pointed at) nor leave istio-proxy
    owning anything but its key and certificates; /etc/certs becomes root's again."""
    fake = fake_vm("ag-symlink")
    assert fake.run().returncode == 0  # boot: pending key and CSR, no certificate within the 1 s wait
    csr = fake.vm.wait_csr()
    fake.vm.issue(csr.public_key())
    assert fake.watch_once().returncode == 0
    assert fake.file("etc/certs/key.pem").is_file() and fake.file("etc/certs/cert-chain.pem").is_file()

    victim_dir = fake.file("etc/victim.d")
    victim_dir.mkdir(mode=0o755)
    victim_file = fake.file("etc/shadow")
    other_key = ec.generate_private_key(ec.SECP256R1())
    victim_file.write_bytes(other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))  # e.g. an SSH host key
    victim_file.chmod(0o600)
    victim = victim_file.read_bytes()
    for legacy in ("etc/certs", "var/lib/istio", "var/lib/istio/envoy"):
        os.chown(fake.file(legacy), PROXY_UID, PROXY_UID)
    planted = plant_symlinks(fake, victim_dir, victim_file)
    assert "etc/certs/key.pem" in planted and "etc/certs/key.next.pem" in planted and "var/lib/istio/envoy" in planted

    fake.vm.set_items(meshjoin_rekey="after-the-attack")
    assert fake.watch_once().returncode == 0
    for target in (victim_dir, victim_file, fake.file("etc")):
        st = os.lstat(target)
        assert (st.st_uid, st.st_gid) == (0, 0), target
    assert victim_file.read_bytes() == victim and victim_file.stat().st_mode & 0o777 == 0o600
    assert victim_dir.stat().st_mode & 0o777 == 0o755 and list(victim_dir.iterdir()) == []
    # The planted key.pem was removed, not followed: the VM makes a fresh key, never one it was pointed at.
    new_csr = fake.vm.wait_csr(other_than=spki(csr.public_key()))
    assert spki(new_csr.public_key()) != spki(other_key.public_key())
    assert mode_and_owner(fake.file("etc/certs")) == (0o755, 0)
    for directory in ("var/lib/istio", "var/lib/istio/envoy", "etc/istio", "etc/istio/config", "var/lib/meshjoin"):
        path = fake.file(directory)
        assert not path.is_symlink() and path.is_dir() and path.stat().st_uid == 0, directory
    env = fake.file("var/lib/istio/envoy/cluster.env")  # sourced by istio-start.sh as root
    assert not env.is_symlink() and env.stat().st_uid == 0

    fake.vm.issue(new_csr.public_key())
    assert fake.watch_once().returncode == 0
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        assert not fake.file(f"etc/certs/{name}").is_symlink() and fake.file(f"etc/certs/{name}").is_file(), name
    assert spki(serialization.load_pem_private_key(fake.file("etc/certs/key.pem").read_bytes(), None)
                .public_key()) == spki(new_csr.public_key())
    owned_by_proxy = sorted(str(p.relative_to(fake.root)) for p in fake.root.rglob("*")
                            if os.lstat(p).st_uid == PROXY_UID and not p.is_symlink())
    assert owned_by_proxy == ["etc/certs/cert-chain.pem", "etc/certs/key.pem", "etc/certs/root-cert.pem"]


UNIT_SCRIPT = """#!/bin/bash
set -e
mkdir -p "$MESHJOIN_ROOT/etc/systemd/system" "$MESHJOIN_ROOT/usr/local/sbin"
printf '#!/bin/bash\\necho $$ > "$MESHJOIN_ROOT/watcher-pid"\\nsleep 600 &\\necho $! > "$MESHJOIN_ROOT/child-pid"\\nwait\\n' \\
  > "$MESHJOIN_ROOT/usr/local/sbin/meshjoin-agent"
chmod 0755 "$MESHJOIN_ROOT/usr/local/sbin/meshjoin-agent"
printf '[Service]\\nExecStart=/usr/local/sbin/meshjoin-agent watch\\nRestart=always\\n' \\
  > "$MESHJOIN_ROOT/etc/systemd/system/meshjoin-watch.service"
systemctl start meshjoin-watch.service
"""


def test_sandbox_down_leaves_no_guest_process_running(tmp_path):
    """A VM's watcher unit runs until the sandbox goes down, and not a moment after: `meshjoin sandbox down`
    ends every guest's processes (the unit's whole process group) before the world process exits."""
    from .conftest import running_sandbox

    with running_sandbox(tmp_path / "sandbox") as own:
        Vm(own, "units-1").create({"startup-script": UNIT_SCRIPT})
        root = Path(own.meshjoin("sandbox", "vm-root", "units-1").stdout.strip())
        pids = wait_for(lambda: (root / "child-pid").exists() and [int((root / f).read_text()) for f in
                                                                  ("watcher-pid", "child-pid")], what="the unit")
        assert all(running(pid) for pid in pids)
    assert not [pid for pid in pids if running(pid)]
