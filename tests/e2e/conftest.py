"""One sandbox for the end-to-end tests: started with the real `meshjoin sandbox up`, used through
the real CLIs and client libraries, stopped at the end of the session. The client itself
(meshjoin_sandbox.client) is the benchmarks' too; what is here is the tests' own: who may join, and the
checks that no private key leaves the VMs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

# MESHJOIN and wait_for are re-exported: the test files import them from here.
from meshjoin_sandbox.client import MESHJOIN, SandboxClient, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[2]

# The e2e tests' sandbox is the shared client, started through the real CLI.
Sandbox = SandboxClient


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
                    up_args: tuple[str, ...] = ()) -> Sandbox:
    """Context: `meshjoin sandbox up` with extra function settings (and `up_args`), always `down` afterwards."""
    function_env = {"MESHJOIN_IDENTITY_BINDINGS": json.dumps([*E2E_BINDINGS, *(bindings or [])]),
                    **(function_env or {})}
    return Sandbox.start(state_dir, function_env, up_args=up_args)


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
