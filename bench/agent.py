"""The VM's side of a join at the protocol level, for benchmarks that drive thousands of VMs.

The real agent (the startup-script, run by the sandbox in each VM's fake root) costs a bash process,
several python3 and openssl processes and paced guest-attribute writes per VM: fine for tests, too
heavy to run 1,000 at once beside the functions being measured. The benchmarks measure meshjoin, so
each VM's part is played here on the same wire: its key is made here (and stays here, like on a VM),
its CSR goes to the VM's OWN metadata server as guest attribute `meshjoin/csr`, the nudge goes to the
events topic through the real Pub/Sub emulator, the certificate is read back from the VM's metadata
with `wait_for_change`, and the report goes back through guest attributes. What meshjoin sees is what
the real agent sends.
"""

from __future__ import annotations

import base64
import json
import time

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

GUEST = "/computeMetadata/v1/instance/guest-attributes/meshjoin"
CERT_CHAIN = "/computeMetadata/v1/instance/attributes/meshjoin-cert-chain"
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
# GCE takes bursts of 3 guest-attribute writes a second per VM: the real agent spaces its writes too.
WRITE_SPACING_S = 0.4


class ProtocolAgent:
    """One VM's agent: make a key, send its CSR, wait for its certificate, report it."""

    def __init__(self, world, name: str, zone: str | None = None, session: requests.Session | None = None):
        self.world = world
        self.name = name
        self.zone = zone or world.zone
        self.http = session or requests.Session()
        self.http.headers["Metadata-Flavor"] = "Google"
        self.host = world.control("POST", "/vm-metadata", {"zone": self.zone, "name": name})["host"]
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public = self.key.public_key().public_bytes(*SPKI)
        self.serial = ""

    def _put(self, key: str, value: str) -> None:
        for attempt in range(5):
            answer = self.http.put(f"http://{self.host}{GUEST}/{key}", data=value.encode(), timeout=30)
            if answer.status_code != 429:
                answer.raise_for_status()
                return
            time.sleep(1 + attempt)  # over GCE's per-VM write rate: the real agent backs off the same way
        answer.raise_for_status()

    def send_csr(self) -> None:
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(self.key, hashes.SHA256())
        self._put("csr", csr.public_bytes(serialization.Encoding.PEM).decode())

    def nudge(self) -> None:
        """What the agent publishes after each change: the VM's name, in the operator-message form."""
        cfg = self.world.cfg
        message = json.dumps({"project": self.world.project, "zone": self.zone, "instance": self.name}).encode()
        url = f"{cfg.url('pubsub')}/v1/projects/{self.world.project}/topics/{cfg.events_topic}:publish"
        answer = self.http.post(url, json={"messages": [{"data": base64.b64encode(message).decode()}]}, timeout=30)
        answer.raise_for_status()

    def certificate(self) -> x509.Certificate | None:
        """The leaf in the VM's metadata if it certifies this agent's key, else None."""
        answer = self.http.get(f"http://{self.host}{CERT_CHAIN}", timeout=30)
        if answer.status_code != 200 or not answer.text:
            return None
        leaf = x509.load_pem_x509_certificates(answer.text.encode())[0]
        return leaf if leaf.public_key().public_bytes(*SPKI) == self.public else None

    def wait_certificate(self, timeout: float) -> x509.Certificate:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaf = self.certificate()
            if leaf is not None:
                self.serial = format(leaf.serial_number, "x")
                return leaf
            left = max(1, int(deadline - time.monotonic()))
            # Returns when the VM's metadata changes (or after `left` seconds), as the agent waits.
            self.http.get(f"http://{self.host}/computeMetadata/v1/instance/attributes/",
                          params={"wait_for_change": "true", "timeout_sec": str(min(left, 30))}, timeout=left + 5)
        raise TimeoutError(f"{self.name}: no certificate for its key within {timeout} s")

    def report(self) -> None:
        """The confirmation: the certificate it installed, with its sidecar running."""
        for key, value in (("agent-version", "bench"), ("cert-serial", self.serial), ("sidecar", "running")):
            self._put(key, value)
            time.sleep(WRITE_SPACING_S)
