"""One sandbox for the end-to-end tests: started with the real `meshjoin sandbox up`, used through
the real CLIs and client libraries, stopped (and checked to be gone) at the end of the session."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshjoin_sandbox.launcher import json_lines, read_env_file

REPO = Path(__file__).resolve().parents[2]
MESHJOIN = str(Path(sys.executable).with_name("meshjoin"))


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` returns something truthy; return it, or fail saying what we waited for."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Sandbox:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env_vars = read_env_file(state_dir / "env")
        self.config = json.loads((state_dir / "sandbox.json").read_text())
        self.project = self.config["project"]
        self.zone = self.config["zone"]

    @property
    def env(self) -> dict[str, str]:
        """The process environment a person gets after `source DIR/env`."""
        return {**os.environ, **self.env_vars}

    def meshjoin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([MESHJOIN, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"meshjoin {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result.stdout}{result.stderr}")
        return result

    # --- observations through the real clients ---------------------------------------------------

    def vm(self, name: str, zone: str | None = None) -> dict | None:
        result = self.meshjoin("sandbox", "vm", name, "--json", *(["--zone", zone] if zone else []), check=False)
        if result.returncode != 0:
            if "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def metadata(self, name: str, zone: str | None = None) -> dict[str, str]:
        vm = self.vm(name, zone) or {}
        return {i["key"]: i.get("value", "") for i in vm.get("metadata", {}).get("items", [])}

    def status(self, name: str, zone: str | None = None) -> dict:
        raw = self.metadata(name, zone).get("meshjoin-status")
        return json.loads(raw) if raw else {}

    def kubectl_json(self, *args: str) -> dict | None:
        result = self.run("kubectl", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def entries(self) -> list[dict]:
        return self.kubectl_json("get", "workloadentries", "-A")["items"]

    def entries_for(self, name: str) -> list[dict]:
        return [e for e in self.entries() if e["metadata"]["annotations"].get("meshjoin.dev/instance") == name]

    def function_log(self, name: str = "events_fn") -> list[dict]:
        return json_lines((self.state_dir / "logs" / f"{name}.log").read_text(errors="replace"))

    def raw_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.state_dir / "logs").glob("*.log"))

    def logged(self, instance: str, outcome: str) -> list[dict]:
        return [e for e in self.function_log() if e.get("instance") == instance and e.get("outcome") == outcome]

    def publish(self, payload: dict | str) -> None:
        message = payload if isinstance(payload, str) else json.dumps(payload)
        self.run("gcloud", "pubsub", "topics", "publish", self.env_vars["MESHJOIN_EVENTS_TOPIC"],
                 "--message", message)

    def ca_file(self, name: str) -> Path:
        return Path(self.config["ca_dir"]) / name

    # --- the VM's side -----------------------------------------------------------------------------

    def confirm(self, name: str, zone: str | None = None) -> str:
        """Run the VM's own agent, as its owner would (`sudo google_metadata_script_runner startup`): the
        sandbox runs the real startup-script in the VM's fake root; it makes the VM's key, sends its CSR
        through guest attributes, nudges meshjoin, installs the certificate meshjoin signs and reports it.
        Blocks while a boot run of the agent is still going (one run at a time per VM)."""
        args = ["sandbox", "run-startup", name] + (["--zone", zone] if zone else [])
        result = self.meshjoin(*args, check=False)
        assert result.returncode == 0, f"the agent on {name} failed: {result.stdout}{result.stderr}"
        return result.stdout

    def vm_root(self, name: str, zone: str | None = None) -> Path:
        """The VM's fake root (what `meshjoin sandbox vm-root NAME` prints)."""
        return Path(self.meshjoin("sandbox", "vm-root", name, *(["--zone", zone] if zone else [])).stdout.strip())

    def certs(self, name: str, zone: str | None = None) -> dict[str, str]:
        """The files in the VM's /etc/certs (empty strings for missing ones)."""
        directory = self.vm_root(name, zone) / "etc" / "certs"
        return {f: (directory / f).read_text() if (directory / f).exists() else ""
                for f in ("key.pem", "key.next.pem", "cert-chain.pem", "root-cert.pem")}

    def join_confirmed(self, name: str, zone: str | None = None, timeout: float = 20.0) -> dict:
        """Wait until meshjoin did its part (waiting), confirm as the agent would, wait until joined."""
        wait_for(lambda: (self.status(name, zone).get("state") in ("waiting", "joined")), timeout=timeout,
                 what=f"{name} delivered")
        if self.status(name, zone).get("state") == "waiting":
            self.confirm(name, zone)  # the boot run may have missed the bootstrap (written after boot)
        return wait_for(lambda: (s := self.status(name, zone)).get("state") == "joined" and s, timeout=timeout,
                        what=f"{name} joined")


SANDBOX_PROJECT = "meshjoin-sandbox"


def account(name: str) -> str:
    """The service account a test VM runs as: its own (one per VM, as the README recommends)."""
    return f"{name}@{SANDBOX_PROJECT}.iam.gserviceaccount.com"


def bound(name: str, namespace: str = "default", ksa: str = "default", apps: list[str] | None = None) -> dict:
    """An identity binding for the test VM `name`'s own account (its app defaults to its name)."""
    return {"gsa": account(name), "namespace": namespace, "serviceAccount": ksa, "apps": apps or [name]}


# Who may join in the end-to-end sandboxes: the sandbox's default (orders) plus each test VM's own account,
# bound as that test needs. A VM whose account is missing here is denied with nothing written.
E2E_BINDINGS = [
    {"gsa": account("orders"), "namespace": "apps", "serviceAccount": "orders", "apps": ["orders"]},
    *(bound(name) for name in ("plain-1", "flip-1", "gone-1", "lost-1", "dup-live", "dup-dead", "evil-1", "evil-2",
                               "cli-denied", "cli-missed", "cli-inline", "m-lost", "m-gone", "m-renew", "m-rot", "m-fail",
                               "m-cap-1", "m-cap-2", "m-cap-3", "bad-ports", "lost-2", "inject-nl", "inject-q",
                               "inject-dq", "late-1", "gc-1")),
    bound("web-1", "apps", "web"), bound("cli-ok", "apps", "api"),
    *(bound(name, "apps", "default") for name in ("inject-ok", "agent-md", "agent-off", "agent-sum", "agent-leave",
                                                 "agent-symlink")),
    bound("hk-src", "apps", "hk"), bound("hk-move", "apps", "hk-move"), bound("hk-drop", "apps", "hk-drop"),
    {"gsa": account("hk-moved"), "namespace": "payments", "serviceAccount": "moved", "apps": ["hk-move"]},
    bound("agent-confirm", "apps", "confirm"), bound("agent-boot", "apps", "boot"), bound("agent-watch", "apps", "watch"), bound("agent-watch", "apps", "watch-b"),
]


def running_sandbox(state_dir: Path, function_env: dict[str, str] | None = None, bindings: list[dict] | None = None,
                    up_args: tuple[str, ...] = ()):
    """Context: `meshjoin sandbox up` with extra function settings (and `up_args`), always `down` afterwards."""
    import contextlib

    function_env = {"MESHJOIN_IDENTITY_BINDINGS": json.dumps([*E2E_BINDINGS, *(bindings or [])]),
                    **(function_env or {})}

    @contextlib.contextmanager
    def manage():
        extra = [arg for k, v in (function_env or {}).items() for arg in ("--function-env", f"{k}={v}")]
        up = subprocess.run([MESHJOIN, "sandbox", "up", "--state-dir", str(state_dir), *extra, *up_args],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        try:
            yield Sandbox(state_dir)
        finally:
            subprocess.run([MESHJOIN, "sandbox", "down", "--state-dir", str(state_dir)], capture_output=True,
                           timeout=60)

    return manage()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Sandbox:
    with running_sandbox(tmp_path_factory.mktemp("sandbox")) as world:
        yield world


def b64(data: dict) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


# --- where private keys may be (issue 14: only in the VMs' fake roots) --------------------------------------


def vm_key_dirs(sandbox: Sandbox) -> list[Path]:
    """Every VM's /etc/certs in the sandbox (each fake root is STATE_DIR/vms/ZONE/NAME/root)."""
    return sorted(vm / "root" / "etc" / "certs" for vm in (sandbox.state_dir / "vms").glob("*/*")
                  if (vm / "root" / "etc" / "certs").is_dir())


def vm_private_keys(sandbox: Sandbox) -> dict[str, bytes]:
    """path -> DER of every private key file found in any VM's /etc/certs."""
    from cryptography.hazmat.primitives import serialization

    keys = {}
    for directory in vm_key_dirs(sandbox):
        for path in directory.glob("key*.pem"):
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            keys[str(path)] = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
    return keys


def key_fingerprints(der: bytes) -> list[str]:
    """Forms a leaked key could take in text: its PKCS#8 base64 (as a PEM body line would hold it, and
    in one piece), its hex, and the raw private scalar of an EC key in base64/hex."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    body = base64.b64encode(der).decode()
    forms = [body[64:128] or body, der.hex()[:64]]
    key = serialization.load_der_private_key(der, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        forms += [base64.b64encode(scalar).decode()[:40], scalar.hex()]
    return forms


def everything_outside_the_vms(sandbox: Sandbox, names: list[str]) -> dict[str, str]:
    """What a key could leak into outside the VMs: every VM's metadata and guest attributes, project
    metadata, every Secret Manager secret's latest payload, every listable Kubernetes object, the
    functions' and emulators' logs, the VMs' consoles, and the CLI's output (status; explain and render
    of two of `names`). The CLIs people use where one call covers all; the REST APIs, as the operator,
    for what gcloud would need a process per VM or secret for."""
    import requests

    ports, project = sandbox.config["ports"], sandbox.project
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {sandbox.config['admin_token']}"
    instances = sandbox.run("gcloud", "compute", "instances", "list", "--format=json").stdout
    corpus = {
        "instances": instances,
        "project metadata": sandbox.run("gcloud", "compute", "project-info", "describe", "--format=json").stdout,
        "logs": sandbox.raw_logs(),
        "meshjoin status": sandbox.meshjoin("status", "--json").stdout,
    }
    # The VMs' consoles and journals are outside their roots too: the agent must never print a key.
    for path in sorted((sandbox.state_dir / "vms").glob("*/*/serial.log")) + \
            sorted((sandbox.state_dir / "vms").glob("*/*/log/**/*")):
        if path.is_file():
            corpus[str(path.relative_to(sandbox.state_dir))] = path.read_text(errors="replace")
    for vm in json.loads(instances):
        zone = vm["zone"].rsplit("/", 1)[-1]
        answer = http.get(f"http://127.0.0.1:{ports['compute']}/compute/v1/projects/{project}/zones/{zone}/instances/"
                          f"{vm['name']}/getGuestAttributes", params={"queryPath": "meshjoin/"}, timeout=30)
        corpus[f"guest attributes of {zone}/{vm['name']}"] = answer.text
    secrets_url = f"http://127.0.0.1:{ports['secretmanager']}/v1/projects/{project}/secrets"
    listed = http.get(secrets_url, params={"pageSize": 250}, timeout=30)
    listed.raise_for_status()
    for secret in listed.json().get("secrets", []):
        secret_id = secret["name"].rsplit("/", 1)[-1]
        answer = http.get(f"{secrets_url}/{secret_id}/versions/latest:access", timeout=30)
        data = answer.json().get("payload", {}).get("data", "") if answer.ok else ""
        corpus[f"secret {secret_id}"] = base64.b64decode(data).decode(errors="replace") + answer.text
    resources = sandbox.run("kubectl", "api-resources", "--verbs=list", "-o", "name").stdout.split()
    corpus["kubernetes objects"] = sandbox.run("kubectl", "get", ",".join(resources), "-A", "-o", "json").stdout
    assert '"kind": "WorkloadEntry"' in corpus["kubernetes objects"] or not sandbox.entries(), "the listing is whole"
    for name in names[:2]:  # the CLI's per-VM views print the same fields for every VM: two are enough
        for verb in ("explain", "render"):
            result = sandbox.meshjoin(verb, name, check=False)
            corpus[f"meshjoin {verb} {name}"] = result.stdout + result.stderr
    return corpus


CA_KEY_SECRET = "secret istio-ca-key"  # the plug-in CA's own key: the one private key meshjoin reads


def private_key_leaks(sandbox: Sandbox, names: list[str]) -> list[str]:
    """Where outside the VMs' fake roots a private key (PEM label, or any VM key's bytes) appears."""
    keys = vm_private_keys(sandbox)
    assert keys, "no VM holds a key: nothing to look for"
    corpus = everything_outside_the_vms(sandbox, names)
    # The scan reads what it claims to: the CA's key (the one expected private key) and the VMs' CSRs.
    assert "PRIVATE KEY" in corpus[CA_KEY_SECRET], "the scan did not read Secret Manager"
    assert any("CERTIFICATE REQUEST" in text for where, text in corpus.items() if where.startswith("guest attr")), \
        "the scan read no guest attributes"
    leaks = []
    for where, text in corpus.items():
        if "PRIVATE KEY" in text and where != CA_KEY_SECRET:
            leaks.append(f"{where}: a PEM private key")
        for path, der in keys.items():
            if any(form in text for form in key_fingerprints(der)):
                leaks.append(f"{where}: the key of {path}")
    return leaks


def verify_vm_identity(certs: dict[str, str], spiffe: str, root_pem: str) -> object:
    """key.pem belongs to the leaf of cert-chain.pem, whose only SAN is `spiffe`, and the chain links
    signature by signature to a root in `root_pem`. Returns the leaf."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(certs["key.pem"].encode(), password=None)
    chain = x509.load_pem_x509_certificates(certs["cert-chain.pem"].encode())
    leaf = chain[0]
    assert leaf.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        key.public_key().public_bytes(serialization.Encoding.DER, spki), "key.pem is not the leaf's key"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    assert not san.get_values_for_type(x509.DNSName)
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    roots = x509.load_pem_x509_certificates(root_pem.encode())
    top = chain[-1]
    assert top in roots or any(_issued_by(top, root) for root in roots), "the chain does not reach the mesh root"
    return leaf


def _issued_by(child, parent) -> bool:
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:
        return False
