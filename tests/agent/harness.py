"""A test harness for the VM agent (shared/meshjoin/agent/meshjoin-agent.sh): the real script, in bash, as root,
in a throwaway root, with no network.

What is real: bash, the agent's text byte for byte, openssl (keys, requests, verification), curl, python3,
flock, install/mv/stat/chown (the files' owners and modes are the real ones). What stands in:

- `MetadataServer`: a loopback stdlib HTTP server playing this VM's GCE metadata server (instance and project
  attributes with the instance's ETag and `wait_for_change`, instance/id, the service account token, guest
  attributes, project-id/zone/name) and the Pub/Sub publish endpoint the agent nudges. Every request is
  recorded, so a test can read what left the VM.
- PATH stubs for what would change the host (systemctl, dpkg, dpkg-query, useradd, id and chown for the
  istio-proxy user, logger) and `sleep` (the agent spaces its guest-attribute writes by 0.4 s: recorded, not
  slept, so a run takes a fraction of a second). Each records its calls under `log/`.
- `Issuer`: plays meshjoin's part, signing a VM's public key with a throwaway CA (root -> intermediate -> leaf).

Metadata server semantics kept from GCE (cloud.google.com/compute/docs/metadata/querying-metadata and
.../manage-guest-attributes, .../troubleshooting/troubleshoot-metadata-server): requests without
`Metadata-Flavor: Google` are refused (403); `?recursive=true&alt=json` answers the attributes as one JSON
object with an ETag; `wait_for_change=true&last_etag=E&timeout_sec=N` answers at once when the ETag differs, else
when the metadata changes or N seconds pass; a guest-attribute write while guest attributes are disabled is 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshjoin import bootstrap
from meshjoin.model import Identity, VmKey
from meshjoin.settings import Settings

AGENT = Path(bootstrap.__file__).parent / bootstrap.AGENT_FILE  # the shipped file, run in place (never copied)
PROXY_UID = 1337  # what the id/chown stubs map istio-proxy to: ownership stays real and checkable
INSTALLED_SIDECAR = "1.24.0-image"  # the stock image of these tests has istio-sidecar baked in
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

STUBS = {
    # systemd: recorded; `is-active`/`is-failed` answer from what start/stop did (or a test planted).
    "systemctl": """echo "$*" >> "$LOG/systemctl"
case "$1" in
  is-active) [ -f "$LOG/units/${3:-$2}.active" ]; exit ;;
  is-failed) [ -f "$LOG/units/${3:-$2}.failed" ]; exit ;;
esac
if [ -f "$LOG/refuse-$1" ]; then echo "Job for $2 failed (stub)" >&2; exit 1; fi
mkdir -p "$LOG/units"
case "$1" in
  start | restart) touch "$LOG/units/$2.active" ;;
  stop) rm -f "$LOG/units/$2.active" ;;
esac""",
    "dpkg": """echo "$*" >> "$LOG/dpkg"
if [ "$1" = -i ]; then dpkg-deb -f "$2" Version > "$LOG/installed-version"; fi""",
    "dpkg-query": """[ -f "$LOG/installed-version" ] || exit 1
printf 'installed %s' "$(cat "$LOG/installed-version")\"""",
    "useradd": """echo "$*" >> "$LOG/useradd"
touch "$LOG/user-exists\"""",
    "id": f"""if {{ [ "$1" = -u ] || [ "$1" = -g ]; }} && [ "$2" = istio-proxy ]; then
  [ -f "$LOG/user-exists" ] && echo {PROXY_UID}; exit
fi
exec {{id}} "$@\"""",
    "chown": f"""owner="$1"
shift
case "$owner" in istio-proxy) owner={PROXY_UID} ;; istio-proxy:istio-proxy) owner={PROXY_UID}:{PROXY_UID} ;; esac
exec {{chown}} "$owner" "$@\"""",
    "logger": """echo "$*" >> "$LOG/journal\"""",
    "sleep": """echo "$*" >> "$LOG/sleep\"""",
}


# --- meshjoin's part: the CA -------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshjoin-tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Issuer:
    """A root and an intermediate CA; signs a public key as meshjoin does (the SPIFFE id as the only name)."""

    def __init__(self, name: str = "meshjoin test"):
        now = datetime.now(timezone.utc)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca(_name(f"{name} root"), self.root_key, _name(f"{name} root"), self.root_key, now)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._ca(_name(f"{name} intermediate"), self.ca_key, self.root.subject, self.root_key, now)

    @staticmethod
    def _ca(subject, key, issuer, signer, now) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
                .not_valid_after(now + timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(signer, hashes.SHA256()))

    @property
    def root_pem(self) -> str:
        return pem(self.root)

    def sign(self, public_key, serial: int | None = None, expired: bool = False) -> str:
        """The chain meshjoin writes as `meshjoin-cert-chain`: the leaf, then the intermediate."""
        now = datetime.now(timezone.utc)
        not_after = now - timedelta(minutes=5) if expired else now + timedelta(hours=24)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca.subject)
                .public_key(public_key).serial_number(serial or x509.random_serial_number())
                .not_valid_before(now - timedelta(hours=2)).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/apps/sa/agent-test")]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.ca_key, hashes.SHA256()))
        return pem(leaf) + pem(self.ca)


def csr_public_key(csr_pem: str):
    return x509.load_pem_x509_csr(csr_pem.encode()).public_key()


def spki(public_key) -> bytes:
    return public_key.public_bytes(*SPKI)


# --- the VM's metadata server (and the Pub/Sub endpoint it nudges) -----------------------------------------------


@dataclass
class Request:
    method: str
    path: str  # with the query
    headers: dict[str, str]
    body: bytes


@dataclass
class MetadataState:
    instance: dict[str, str] = field(default_factory=dict)  # instance attributes
    project: dict[str, str] = field(default_factory=dict)  # project attributes
    instance_id: str = "4815162342"
    project_id: str = "tenant-project"
    zone: str = "projects/123456789/zones/europe-west1-b"
    name: str = "vm-1"
    guest: dict[str, str] = field(default_factory=dict)  # namespace meshjoin
    guest_enabled: bool = True
    guest_refusals: list[int] = field(default_factory=list)  # statuses answered to the next guest writes
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path (no query) -> forced answer
    publish_status: int = 200
    published: list[dict] = field(default_factory=list)  # the decoded messages published to the events topic
    files: dict[str, bytes] = field(default_factory=dict)  # /files/NAME: e.g. a sidecar package
    requests: list[Request] = field(default_factory=list)


class MetadataServer:
    """This VM's metadata server on loopback. `on_guest_write(key, value)` runs after a guest attribute is stored
    (a test's issuer answering a CSR at once, as meshjoin's reconcile would)."""

    TOKEN = "ya29.test-token-of-this-vm"
    PREFIX = "/computeMetadata/v1/"

    def __init__(self):
        self.state = MetadataState()
        self.changed = threading.Condition()
        self.on_guest_write = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._body()
                with server.changed:
                    server.state.requests.append(Request(self.command, self.path, dict(self.headers), body))
                status, headers, payload = server.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.changed:
            self.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # what a test changes

    def etag(self) -> str:
        return hashlib.sha256(json.dumps(self.state.instance, sort_keys=True).encode()).hexdigest()[:16]

    def set_instance(self, **items: str | None) -> None:
        """Set (or, with None, remove) instance items; underscores in names become dashes."""
        with self.changed:
            _apply(self.state.instance, items)
            self.changed.notify_all()  # wakes a `wait_for_change` on the instance (the watcher)

    def set_project(self, **items: str | None) -> None:
        with self.changed:
            _apply(self.state.project, items)

    def csr(self) -> str | None:
        return self.state.guest.get("csr")

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in self.state.requests if (method is None or r.method == method) and contains in r.path]

    def guest_writes(self) -> list[str]:
        """The keys of the guest-attribute writes the metadata server accepted or refused, in order."""
        return [r.path.rsplit("/", 1)[1] for r in self.requests("PUT", "/guest-attributes/meshjoin/")]

    # the answers

    def answer(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        url = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path in self.state.answers:
            status, payload = self.state.answers[path]
            return status, {}, payload
        if path.startswith("/v1/projects/") and path.endswith(":publish") and method == "POST":
            return self._publish(headers, body)
        if path.startswith("/files/"):
            data = self.state.files.get(path[len("/files/"):])
            return (200, {}, data) if data is not None else (404, {}, b"not found")
        if not path.startswith(self.PREFIX):
            return 404, {}, b"not found"
        if headers.get("Metadata-Flavor") != "Google":
            return 403, {}, b"Missing Metadata-Flavor:Google header."
        rest = path[len(self.PREFIX):]
        if rest.startswith("instance/guest-attributes/meshjoin/"):
            return self._guest(method, rest.rsplit("/", 1)[1], body)
        if method != "GET":
            return 405, {}, b"method not allowed"
        if rest == "instance/attributes/":
            return self._attributes(query)
        if rest == "project/attributes/":
            return 200, {"Content-Type": "application/json"}, json.dumps(self.state.project).encode()
        plain = {"instance/id": self.state.instance_id, "project/project-id": self.state.project_id,
                 "instance/zone": self.state.zone, "instance/name": self.state.name}
        if rest in plain:
            return 200, {"Content-Type": "application/text"}, plain[rest].encode()
        if rest == "instance/service-accounts/default/token":
            token = {"access_token": self.TOKEN, "expires_in": 3599, "token_type": "Bearer"}
            return 200, {"Content-Type": "application/json"}, json.dumps(token).encode()
        return 404, {}, b"not found"

    def _attributes(self, query: dict[str, str]) -> tuple[int, dict, bytes]:
        with self.changed:
            if query.get("wait_for_change") == "true":
                timeout = float(query.get("timeout_sec") or 0)
                last = query.get("last_etag", "")
                self.changed.wait_for(lambda: self.etag() != last, timeout=min(timeout, 30))
            payload = json.dumps(self.state.instance).encode()
            return 200, {"Content-Type": "application/json", "ETag": self.etag()}, payload

    def _guest(self, method: str, key: str, body: bytes) -> tuple[int, dict, bytes]:
        with self.changed:
            if not self.state.guest_enabled:
                return 403, {}, b"Guest attributes endpoint access is disabled."
            if self.state.guest_refusals:
                return self.state.guest_refusals.pop(0), {}, b"refused by the test"
            if method == "PUT":
                self.state.guest[key] = body.decode()
            elif method == "DELETE":
                self.state.guest.pop(key, None)
            else:
                return 405, {}, b"method not allowed"
        if method == "PUT" and self.on_guest_write is not None:
            self.on_guest_write(key, body.decode())
        return 200, {}, b""

    def _publish(self, headers, body: bytes) -> tuple[int, dict, bytes]:
        if headers.get("Authorization") != f"Bearer {self.TOKEN}":
            return 401, {}, json.dumps({"error": {"code": 401, "message": "no token"}}).encode()
        if self.state.publish_status != 200:
            error = {"error": {"code": self.state.publish_status, "message": "User not authorized to perform this "
                                                                             "action."}}
            return self.state.publish_status, {"Content-Type": "application/json"}, json.dumps(error).encode()
        for message in json.loads(body)["messages"]:
            self.state.published.append(json.loads(base64.b64decode(message["data"])))
        return 200, {"Content-Type": "application/json"}, json.dumps({"messageIds": ["1"]}).encode()


# --- the VM: a throwaway root, the stubs, the runs -----------------------------------------------------------------


def deployment(server: MetadataServer, issuer: Issuer, **overrides) -> Settings:
    """Fill the metadata as meshjoin would for a VM it admitted: the deployment's items in project metadata (as
    meshjoin's Terraform writes them), this VM's own items in instance metadata (as the reconcile writes them)."""
    settings = Settings(project="meshjoin-host", cluster="projects/meshjoin-host/locations/l/clusters/c",
                        istiod_ip="10.128.0.9", events_topic="projects/meshjoin-host/topics/meshjoin-events",
                        pubsub_endpoint=f"http://{server.host}", **overrides)
    server.state.project.update(bootstrap.deployment_items(settings))
    key = VmKey(server.state.project_id, server.state.zone.rsplit("/", 1)[1], server.state.name)
    identity = Identity("apps", "agent-test", "app", "v1", {"http": 8080})
    server.state.instance.update(bootstrap.bootstrap_items(key, identity, settings, root_pem=issuer.root_pem))
    return settings


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    journal: list[str]  # the lines this run logged (logger -t meshjoin)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.journal)


class Vm:
    """One VM's guest side: its root, the stubs, its metadata server; runs the agent as its startup script does."""

    def __init__(self, base: Path, server: MetadataServer):
        self.server = server
        self.base = base
        self.root, self.bin, self.log, self.tmp = base / "root", base / "bin", base / "log", base / "tmp"
        for directory in (self.root / "etc", self.bin, self.log, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
        real = {"id": shutil.which("id") or "/usr/bin/id", "chown": shutil.which("chown") or "/bin/chown"}
        for tool, body in STUBS.items():
            stub = self.bin / tool
            stub.write_text(f"#!/bin/sh\nLOG={self.log}\n"
                            + body.replace("{id}", real["id"]).replace("{chown}", real["chown"]) + "\n")
            stub.chmod(0o755)
        (self.log / "user-exists").touch()  # a stock image whose istio-sidecar package made the user
        (self.log / "installed-version").write_text(INSTALLED_SIDECAR)
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("MESHJOIN_", "GCE_METADATA", "CLOUDSDK_", "GOOGLE_"))}
        self.env = {**inherited, "PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "MESHJOIN_ROOT": str(self.root), "GCE_METADATA_HOST": server.host, "TMPDIR": str(self.tmp),
                    "MESHJOIN_WAIT_SECONDS": "0"}

    def _run(self, argv: list[str], env: dict[str, str], stdin: str | None = None) -> Run:
        before = len(self.journal())
        done = subprocess.run(argv, env={**self.env, **env}, input=stdin, capture_output=True, text=True,
                              timeout=60)
        return Run(done.returncode, done.stdout, done.stderr, self.journal()[before:])

    def boot(self, **env: str) -> Run:
        """The startup script: `bash FILE` (as the stub runs it)."""
        return self._run(["bash", str(AGENT)], env)

    def watch_once(self, **env: str) -> Run:
        """One turn of the watcher, run from the copy the boot installed (as meshjoin-watch.service does)."""
        return self._run(["bash", str(self.file("usr/local/sbin/meshjoin-agent")), "watch", "--once"], env)

    def call(self, snippet: str, **env: str) -> Run:
        """Source the agent (main does not run) and run SNIPPET: its functions, one at a time."""
        return self._run(["bash", "-c", 'source "$1"; ' + snippet, "agent-test", str(AGENT)], env)

    def file(self, path: str) -> Path:
        return self.root / path

    def calls(self, tool: str) -> list[str]:
        path = self.log / tool
        return path.read_text().splitlines() if path.exists() else []

    def journal(self) -> list[str]:
        """What the agent logged, as `PRIORITY: MESSAGE` (the logger stub records `-t meshjoin -p user.P -- M`)."""
        entries = []
        for line in self.calls("journal"):
            head, _, message = line.partition(" -- ")
            if head.startswith("-t meshjoin -p user."):
                entries.append(f"{head.removeprefix('-t meshjoin -p user.')}: {message}")
            else:  # a message of several lines
                assert entries, f"logged without the meshjoin tag: {line}"
                entries[-1] += "\n" + line
        return entries

    def state(self, name: str) -> str | None:
        path = self.file(f"var/lib/meshjoin/{name}")
        return path.read_text().rstrip("\n") if path.exists() else None

    def key_pem(self, name: str = "key.pem") -> bytes:
        return self.file(f"etc/certs/{name}").read_bytes()

    def public_key(self, name: str = "key.pem"):
        return serialization.load_pem_private_key(self.key_pem(name), None).public_key()

    def sidecar_active(self) -> bool:
        return (self.log / "units" / "istio.service.active").exists()

    def snapshot(self) -> dict[str, tuple]:
        """Every path under the root: kind, mode, owner, inode, mtime and content (what a second run must keep)."""
        seen = {}
        for path in sorted(self.root.rglob("*")):
            st = os.lstat(path)
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            seen[str(path.relative_to(self.root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                                      st.st_gid, st.st_ino, st.st_mtime_ns, content)
        return seen


def mode_and_owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _apply(metadata: dict[str, str], items: dict[str, str | None]) -> None:
    """Set (or, with None, remove) metadata items; underscores in names become dashes."""
    for key, value in items.items():
        key = key.replace("_", "-")
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
