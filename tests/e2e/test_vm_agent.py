"""The VM agent (the rendered startup-script) run for real, as root, in a throw-away root directory.

Only what would change the host is a PATH shim that records its calls (systemctl, dpkg, dpkg-query,
useradd, id, chown, logger; the sandbox's own, meshjoin_sandbox.guest.SHIMS); the rest is real: curl against the VM's own metadata server and the sandbox's
Secret Manager, python3, openssl, flock, sha256sum, and dpkg-deb reading a package packed here.
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
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshjoin import bootstrap
from meshjoin.model import Identity, VmKey
from meshjoin.settings import Settings
from meshjoin_sandbox.guest import PROXY_UID, guest_env, install_shims, prepare_root

from .conftest import wait_for

IN_CI = bool(os.environ.get("CI"))
SIDECAR_VERSION = "1.24.0-meshjoin-test"
AGENT = "usr/local/sbin/meshjoin-agent"
ISTIOD_HOST_LINE = "10.128.15.250 istiod.istio-system.svc"  # MESHJOIN_ISTIOD_IP/ADDRESS of the sandbox


def need(*tools: str) -> None:
    """Skip without a tool, except in CI, where a missing tool is a broken image and must fail."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing and not IN_CI:
        pytest.skip(f"not installed: {', '.join(missing)}")
    assert not missing, f"CI image lacks {missing}"


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agent") / "startup-script"
    path.write_text(bootstrap.startup_script())
    return path


class Served:
    """A loopback HTTP server (files of a directory by default), counting the requests it answered."""

    def __init__(self, directory: Path | None = None, handler=None):
        self.gets: list[str] = []
        served = self

        class Files(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                served.gets.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler or partial(Files, directory=str(directory)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


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
    yield {"url": served.url("istio-sidecar.deb"), "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
           "served": served}
    served.server.shutdown()


def join(sandbox, name: str, *labels: str) -> dict:
    sandbox.meshjoin("sandbox", "create-vm", name, "--label", "mesh=join", "--label", "mesh-namespace=apps",
                     *[arg for label in labels for arg in ("--label", label)], "--metadata", "mesh-ports=http:8080",
                     "--service-account", f"{name}@meshjoin-sandbox.iam.gserviceaccount.com")
    # meshjoin's part; `joined` comes only once this agent (run by the tests below) confirms.
    return wait_for(lambda: (s := sandbox.status(name)).get("state") in ("waiting", "joined") and s,
                    what=f"{name} delivered")


class FakeVm:
    """A throw-away root plus shims; runs the agent as root against one VM's metadata server."""

    def __init__(self, base: Path, sandbox, name: str, sidecar: dict):
        self.root, self.bin, self.log = base / "root", base / "bin", base / "log"
        prepare_root(self.root)
        install_shims(self.bin, self.log)  # the same shims the sandbox's guests run with
        self.env = {
            **guest_env(self.root, self.bin, sandbox.meshjoin("sandbox", "vm-metadata", name).stdout.strip()),
            "MESHJOIN_SECRETMANAGER_URL": sandbox.env_vars["MESHJOIN_SECRETMANAGER_ENDPOINT"],
            "MESHJOIN_SIDECAR_URL": sidecar["url"],
            "MESHJOIN_SIDECAR_SHA256": sidecar["sha256"],
            "MESHJOIN_WAIT_SECONDS": "10",  # a watcher that finds no change gives up quickly
        }

    def run(self, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=120)

    def boot(self, script: Path, **env: str) -> subprocess.CompletedProcess:
        result = self.run(script, **env)
        assert result.returncode == 0, result.stderr
        return result

    def watch_once(self, **env: str) -> subprocess.CompletedProcess:
        return self.run(self.root / AGENT, "watch", "--once", **env)

    def calls(self, tool: str) -> list[str]:
        path = self.log / tool
        return path.read_text().splitlines() if path.exists() else []

    def systemctl(self) -> list[str]:
        """What the agent told systemd to do (its is-active/is-failed queries for the report left out)."""
        return [c for c in self.calls("systemctl") if not c.startswith(("is-active", "is-failed"))]

    def file(self, path: str) -> Path:
        return self.root / path

    def tree(self) -> dict[str, tuple]:
        """Every file with what a rewrite would change: content, mode, owner, inode, mtime."""
        out = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            if path.name == "etag":
                continue  # bookkeeping of the last metadata seen; other VMs' reconciles move it
            st = path.stat()
            out[str(path.relative_to(self.root))] = (path.read_bytes(), st.st_mode, st.st_uid, st.st_ino,
                                                     st.st_mtime_ns)
        return out


@pytest.fixture
def fake_vm(tmp_path, sandbox, sidecar):
    need("curl", "python3", "openssl", "flock", "sha256sum")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the VM agent test runs the script as root; CI must run it as root")
        pytest.skip("the VM agent runs as root (chown); run the suite as root")
    return lambda name: FakeVm(tmp_path, sandbox, name, sidecar)


def leaf_matches_key(chain_pem: bytes, key_pem: bytes) -> bool:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return leaf.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def assert_certs_are(vm: FakeVm, material: dict) -> None:
    for name, mode in (("key.pem", 0o600), ("cert-chain.pem", 0o644), ("root-cert.pem", 0o644)):
        path = vm.file(f"etc/certs/{name}")
        assert path.read_text() == material[name], name
        assert (path.stat().st_mode & 0o777, path.stat().st_uid) == (mode, PROXY_UID), name
    assert leaf_matches_key(vm.file("etc/certs/cert-chain.pem").read_bytes(), vm.file("etc/certs/key.pem").read_bytes())


# --- the script as text -------------------------------------------------------------------------------------------


def test_rendered_script_is_shellcheck_clean(script):
    need("shellcheck")
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_metadata_values_cannot_add_lines_to_the_script_or_cluster_env(sandbox):
    """The script is the same text for every VM; a value with quotes or newlines is denied, not rendered."""
    for name, ports in (("inject-nl", "http:8080\nEVIL=1"), ("inject-q", "http:8080,x'$(reboot)':1"),
                        ("inject-dq", 'http:"8080"\n')):
        sandbox.meshjoin("sandbox", "create-vm", name, "--label", "mesh=join", "--metadata", f"mesh-ports={ports}",
                         "--service-account", f"{name}@meshjoin-sandbox.iam.gserviceaccount.com")
        status = wait_for(lambda: (s := sandbox.status(name)).get("state") == "denied" and s, what=f"{name} denied")
        assert "mesh-ports" in status["reason"]
        metadata = sandbox.metadata(name)
        assert "meshjoin-cluster-env" not in metadata and "startup-script" not in metadata

    join(sandbox, "inject-ok", "mesh-version=v1")
    metadata = sandbox.metadata("inject-ok")
    template_lines = (Path(bootstrap.__file__).parent / "templates" / "startup-script.sh.j2").read_text().count("\n")
    assert metadata["startup-script"] == bootstrap.startup_script()
    assert metadata["startup-script"].count("\n") == template_lines
    expected_keys = bootstrap.cluster_env(
        VmKey("p", "z", "i"), Identity("ns", "sa", "app", "v1", {"http": 1}),
        Settings(project="p", cluster="projects/p/locations/l/clusters/c")).count("\n")
    env_lines = metadata["meshjoin-cluster-env"].splitlines()
    assert len(env_lines) == expected_keys
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line) for line in env_lines), env_lines


# --- the script run ---------------------------------------------------------------------------------------------


def test_vm_metadata_verb_serves_one_vms_own_view(sandbox):
    join(sandbox, "agent-md")
    host = sandbox.meshjoin("sandbox", "vm-metadata", "agent-md").stdout.strip()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", host)
    assert sandbox.meshjoin("sandbox", "vm-metadata", "agent-md").stdout.strip() == host  # started once
    missing = sandbox.meshjoin("sandbox", "vm-metadata", "no-such-vm", check=False)
    assert missing.returncode != 0 and "no-such-vm" in missing.stderr


def test_boot_lays_down_the_vm_files_and_a_rerun_changes_nothing(sandbox, fake_vm, script, sidecar):
    status = join(sandbox, "agent-boot", "mesh-service-account=boot")
    vm = fake_vm("agent-boot")
    gets_before = len(sidecar["served"].gets)

    vm.boot(script)
    material = sandbox.secret_payload(status["secret"])
    metadata = sandbox.metadata("agent-boot")
    assert_certs_are(vm, material)
    assert vm.file("etc/certs").stat().st_uid == PROXY_UID  # istio-agent writes its rotated certs there
    assert vm.file("var/lib/istio/envoy/cluster.env").read_text() == metadata["meshjoin-cluster-env"]
    assert vm.file("etc/istio/config/mesh").read_text() == metadata["meshjoin-mesh-config"]
    assert vm.file(AGENT).read_text() == script.read_text() and vm.file(AGENT).stat().st_mode & 0o777 == 0o755
    assert f"ExecStart=/{AGENT} watch" in vm.file("etc/systemd/system/meshjoin-watch.service").read_text()
    assert [call.split()[0] for call in vm.calls("dpkg")] == ["-i"]
    assert vm.systemctl() == ["daemon-reload", "enable meshjoin-watch.service",
                                     "restart meshjoin-watch.service", "enable istio.service",
                                     "restart istio.service"]
    first = vm.tree()

    vm.boot(script)
    assert vm.tree() == first  # nothing rewritten: same inodes and mtimes
    vm.boot(script)
    assert vm.tree() == first
    hosts = vm.file("etc/hosts").read_text().splitlines()
    assert hosts[:2] == ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    assert hosts.count(ISTIOD_HOST_LINE) == 1 and len(hosts) == 5  # kept lines + one marked block
    assert len(vm.calls("dpkg")) == 1 and len(sidecar["served"].gets) == gets_before + 1  # no re-download
    assert vm.systemctl()[5:] == ["enable meshjoin-watch.service", "start meshjoin-watch.service",
                                         "enable istio.service", "start istio.service"] * 2
    assert len(vm.calls("useradd")) == 1
    journal = "\n".join(vm.calls("journal"))
    for said in (f"installed {status['secret']}", "cluster.env and mesh config in place", "meshjoin's block",
                 f"installed istio-sidecar {SIDECAR_VERSION} (sha256 verified)", "already installed from this package",
                 "istio.service restarted", "istio.service started", "boot done"):
        assert said in journal, said
    assert "PRIVATE KEY" not in journal


def expired_cert_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "expired")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=3)).not_valid_after(now - timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_boot_refreshes_an_expired_certificate_before_starting_the_sidecar(sandbox, fake_vm, script):
    """After a long power-off the files are still there, but the provisioned cert could not bootstrap: the
    sidecar systemd started from it is restarted once the cert is refreshed."""
    status = join(sandbox, "agent-off")
    vm = fake_vm("agent-off")
    vm.boot(script)
    vm.file("etc/certs/cert-chain.pem").write_bytes(expired_cert_pem())
    starts = len(vm.systemctl())

    vm.boot(script)
    assert_certs_are(vm, sandbox.secret_payload(status["secret"]))
    assert any("the installed certificate has expired" in line for line in vm.calls("journal"))
    assert vm.systemctl()[starts:][-1] == "restart istio.service"  # after the refresh, in the same run


def bad_secret_manager(payload: bytes) -> str:
    """The URL of a Secret Manager that answers every access with this payload."""
    answer = json.dumps({"name": "x", "payload": {"data": base64.b64encode(payload).decode()}}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    return Served(handler=Handler).base


def test_watcher_swaps_in_a_renewed_version_and_keeps_the_old_files_on_a_bad_one(sandbox, fake_vm, script):
    old = join(sandbox, "agent-watch", "mesh-service-account=watch")
    vm = fake_vm("agent-watch")
    vm.boot(script)
    before = vm.tree()

    # A new identity makes meshjoin issue a new secret version and a new cluster.env.
    sandbox.meshjoin("sandbox", "set-labels", "agent-watch", "mesh-service-account=watch-b")
    new = wait_for(lambda: (s := sandbox.status("agent-watch")).get("identity", "").endswith("/sa/watch-b") and s,
                   what="re-issued for the new identity")
    assert new["secret"] != old["secret"]

    other_key = {name: vm.file(f"etc/certs/{name}").read_text() for name in ("cert-chain.pem", "root-cert.pem")}
    other_key["key.pem"] = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    failures = {
        "unreachable": ({"MESHJOIN_SECRETMANAGER_URL": "http://127.0.0.1:9"}, "did not answer"),
        "not JSON": ({"MESHJOIN_SECRETMANAGER_URL": bad_secret_manager(b"\x00garbage")},
                     "payload is not meshjoin's JSON"),
        "foreign key": ({"MESHJOIN_SECRETMANAGER_URL": bad_secret_manager(json.dumps(other_key).encode())},
                        "key.pem does not match its certificate"),
    }
    for what, (env, reason) in failures.items():
        result = vm.watch_once(**env)
        assert result.returncode == 1, what
        assert vm.tree() == before, what  # the old certificates stay in place
        said = vm.calls("journal")[-1]
        assert "install the workload certificate failed" in said and reason in said and "Remedy:" in said, said

    result = vm.watch_once()
    assert result.returncode == 0, result.stderr
    assert_certs_are(vm, sandbox.secret_payload(new["secret"]))
    cluster_env = vm.file("var/lib/istio/envoy/cluster.env").read_text()
    assert cluster_env == sandbox.metadata("agent-watch")["meshjoin-cluster-env"]
    assert "SERVICE_ACCOUNT=watch-b" in cluster_env
    assert vm.systemctl()[-1] == "restart istio.service"  # a new identity needs a fresh bootstrap

    # Nothing of the VM's changed since (meshjoin may still write its status once the VM confirmed):
    # the watcher never restarts the sidecar for that.
    calls = len(vm.systemctl())
    quiet = vm.watch_once(MESHJOIN_WAIT_SECONDS="1")
    assert quiet.returncode == 0 and "restart istio.service" not in vm.systemctl()[calls:]


def test_checksum_gate_refuses_a_package_that_does_not_match(sandbox, fake_vm, script, sidecar):
    join(sandbox, "agent-sum")
    vm = fake_vm("agent-sum")
    result = vm.run(script, MESHJOIN_SIDECAR_SHA256="0" * 64)
    assert result.returncode == 1
    assert vm.calls("dpkg") == [] and not any("istio.service" in call for call in vm.systemctl())
    said = vm.calls("journal")[-1]
    assert f"checksum mismatch for {sidecar['url']}: expected sha256 {'0' * 64}, got {sidecar['sha256']}" in said
    assert "nothing was installed" in said and "Remedy:" in said

    unverified = vm.run(script, MESHJOIN_SIDECAR_SHA256="")
    assert unverified.returncode == 1 and vm.calls("dpkg") == []
    assert "refusing to install an unverified package" in vm.calls("journal")[-1]


def test_watcher_withdraws_the_identity_when_the_vm_leaves(sandbox, fake_vm, script):
    join(sandbox, "agent-leave")
    vm = fake_vm("agent-leave")
    vm.boot(script)
    assert vm.file("etc/certs/key.pem").exists()
    sandbox.meshjoin("sandbox", "set-labels", "agent-leave", "--remove", "mesh")
    wait_for(lambda: sandbox.status("agent-leave").get("state") == "left", what="agent-leave left")
    result = vm.watch_once(MESHJOIN_WAIT_SECONDS="5")
    assert result.returncode == 0, result.stderr
    assert vm.systemctl()[-2:] == ["stop istio.service", "disable istio.service"]
    assert not vm.file("etc/certs/key.pem").exists() and not vm.file("etc/certs/cert-chain.pem").exists()
    assert "left the mesh" in vm.calls("journal")[-1]


def test_defect3_the_agent_reports_the_delivered_certificate_and_the_vm_turns_joined(sandbox, fake_vm, script):
    """The VM's own truth, end to end: meshjoin delivers (waiting, no entry), the real agent boots, lays down
    the certificate, starts the sidecar, reports through guest attributes on its own metadata server and
    nudges meshjoin over Pub/Sub; only then is the VM joined with a WorkloadEntry.
    Needs the sandbox's guest attributes (metadata PUT, Compute getGuestAttributes)."""
    status = join(sandbox, "agent-confirm", "mesh-service-account=confirm")
    assert status["state"] == "waiting" and sandbox.entries_for("agent-confirm") == []
    vm = fake_vm("agent-confirm")
    vm.boot(script, MESHJOIN_WAIT_SECONDS="5")
    journal = "\n".join(vm.calls("journal"))
    assert f"certificate {status['certSerial']}, sidecar running" in journal, journal
    assert "could not write" not in journal, journal
    joined = wait_for(lambda: (s := sandbox.status("agent-confirm")).get("state") == "joined" and s,
                      what="agent-confirm joined after its agent's report")
    assert joined["confirmedSerial"] == status["certSerial"]
    assert len(sandbox.entries_for("agent-confirm")) == 1


def plant_symlinks(vm: FakeVm, victim_dir: Path, victim_file: Path) -> list[str]:
    """What istio-proxy can do: in every directory it owns (write permission), swap each entry for a symlink
    to a root-owned target (files -> a root-only file, directories -> a root directory), and plant a
    symlink under each name the agent could create there. Done as root with the symlinks owned by istio-proxy;
    only directories istio-proxy owns are touched, so it is exactly what that user could do itself."""
    planted = []
    for directory in sorted({p for p in vm.root.rglob("*") if p.is_dir() and not p.is_symlink()} | {vm.root}):
        if directory.stat().st_uid != PROXY_UID:
            continue
        names = {p.name for p in directory.iterdir()} | {"key.pem", "cert-chain.pem", "root-cert.pem", "envoy",
                                                        "cluster.env"}
        for name in sorted(names):
            path = directory / name
            target = victim_dir if path.is_dir() and not path.is_symlink() else victim_file
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            path.symlink_to(target)
            os.lchown(path, PROXY_UID, PROXY_UID)
            planted.append(str(path.relative_to(vm.root)))
    return planted


def test_istio_proxy_symlinks_never_make_the_agent_touch_other_files(sandbox, fake_vm, script):
    """Issue 15: istio-proxy plants symlinks where it can write, then meshjoin delivers a new certificate. The
    converge must neither follow them (no chown/chmod/write of their targets) nor leave istio-proxy owning
    anything but its certificate directory."""
    join(sandbox, "agent-symlink")
    vm = fake_vm("agent-symlink")
    vm.boot(script)
    victim_dir = vm.file("etc/victim.d")
    victim_dir.mkdir(mode=0o755)
    victim_file = vm.file("etc/shadow")
    victim_file.write_text("root:secret\n")
    victim_file.chmod(0o600)
    # A previous agent (or the sidecar package's postinst) left these to istio-proxy: the attack surface.
    for legacy in ("var/lib/istio", "var/lib/istio/envoy"):
        os.chown(vm.file(legacy), PROXY_UID, PROXY_UID)
    planted = plant_symlinks(vm, victim_dir, victim_file)
    assert "etc/certs/key.pem" in planted and "var/lib/istio/envoy" in planted and len(planted) == 10

    old = sandbox.status("agent-symlink")["secret"]
    sandbox.meshjoin("join", "agent-symlink")  # a fresh certificate: the converge rewrites every file
    renewed = wait_for(lambda: (st := sandbox.status("agent-symlink")).get("secret") != old and st,
                       what="a new certificate")
    vm.boot(script)

    for target in (victim_dir, victim_file, vm.file("etc")):
        st = os.lstat(target)
        assert (st.st_uid, st.st_gid) == (0, 0), target
    assert victim_file.read_text() == "root:secret\n" and victim_file.stat().st_mode & 0o777 == 0o600
    assert victim_dir.stat().st_mode & 0o777 == 0o755 and list(victim_dir.iterdir()) == []
    assert vm.file("etc").stat().st_mode & 0o777 == 0o755
    material = sandbox.secret_payload(renewed["secret"])
    assert_certs_are(vm, material)  # regular files again, owned by istio-proxy, right modes
    assert not any(vm.file(f"etc/certs/{n}").is_symlink() for n in ("key.pem", "cert-chain.pem", "root-cert.pem"))
    for directory in ("var/lib/istio", "var/lib/istio/envoy", "etc/istio", "etc/istio/config", "var/lib/meshjoin"):
        path = vm.file(directory)
        assert not path.is_symlink() and path.is_dir() and path.stat().st_uid == 0, directory
    env = vm.file("var/lib/istio/envoy/cluster.env")  # sourced by istio-start.sh as root
    assert not env.is_symlink() and env.stat().st_uid == 0
    owned_by_proxy = sorted(str(p.relative_to(vm.root)) for p in vm.root.rglob("*")
                            if os.lstat(p).st_uid == PROXY_UID and not p.is_symlink())
    assert owned_by_proxy == ["etc/certs", "etc/certs/cert-chain.pem", "etc/certs/key.pem", "etc/certs/root-cert.pem"]
