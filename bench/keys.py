"""What meshjoin pays per certificate now that keys stay on the VMs: `pki.parse_csr` (PEM, signature =
proof of possession, key type) + `pki.certify` (a leaf over the VM's public key, signed by the plug-in CA).

Per leaf algorithm (what `MESHJOIN_KEY_ALGORITHM` allows) and under three plug-in CAs, since the CA's key
signs every leaf: the sandbox's (ECDSA P-256), an RSA-2048 one, and RSA-4096, what Istio's `tools/certs`
Makefiles make by default (ROOTCA_KEYSZ / INTERMEDIATE_KEYSZ ?= 4096). The VM's own cost (key generation +
its CSR's signature) is measured beside it: the VM pays it, once per key, no longer meshjoin.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshjoin import pki
from meshjoin_sandbox import ca as sandbox_ca

SPIFFE = "spiffe://cluster.local/ns/apps/sa/orders"


def _bundle(ca_algorithm: str) -> pki.CaBundle:
    with tempfile.TemporaryDirectory() as tmp:
        if ca_algorithm == "rsa-4096":
            with mock.patch.object(sandbox_ca, "_new_key", lambda _: rsa.generate_private_key(65537, 4096)):
                sandbox_ca.make_plugin_ca(Path(tmp), key_algorithm="rsa-2048")
        else:
            sandbox_ca.make_plugin_ca(Path(tmp), key_algorithm=ca_algorithm)
        files = [(Path(tmp) / f).read_bytes() for f in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem",
                                                          "root-cert.pem")]
    return pki.load_ca_bundle(*files)


def vm_key(leaf: str):
    """What the VM's agent generates (`openssl genpkey`, here with the same library meshjoin uses)."""
    return ec.generate_private_key(ec.SECP256R1()) if leaf == "ecdsa-p256" else rsa.generate_private_key(65537, 2048)


def vm_csr(key) -> str:
    """The agent's PKCS#10 request: an empty subject (meshjoin ignores every name in it anyway)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _rate(fn, min_seconds: float, min_count: int) -> dict:
    samples = []
    started = time.perf_counter()
    while len(samples) < min_count or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    total = sum(samples)
    return {"count": len(samples), "per_second": round(len(samples) / total, 1),
            "p50_ms": round(statistics.median(samples) * 1000, 3)}


def run(quick: bool = False) -> dict:
    now = datetime.now(timezone.utc)
    seconds = 0.5 if quick else 2.0
    results = []
    for ca_algorithm in ("ecdsa-p256", "rsa-2048", "rsa-4096"):
        bundle = _bundle(ca_algorithm)
        for leaf in pki.KEY_ALGORITHMS:
            # A handful of distinct VM keys, so no cache can make one CSR cheaper than the next.
            csrs = [vm_csr(vm_key(leaf)) for _ in range(4)]
            turn = iter(range(10**9))

            def certify_one() -> None:
                verified = pki.parse_csr(csrs[next(turn) % len(csrs)], leaf)
                pki.certify(bundle, verified.public_key, SPIFFE, now=now, ttl=timedelta(hours=24))

            certify = _rate(certify_one, seconds, 5)
            parse = _rate(lambda: pki.parse_csr(csrs[next(turn) % len(csrs)], leaf), seconds / 2, 5)
            on_vm = _rate(lambda: vm_csr(vm_key(leaf)), seconds / 2, 5)
            results.append({"ca": ca_algorithm, "leaf": leaf, "certify": certify, "parse_csr": parse,
                            "vm_keygen_and_csr": on_vm})
    return {"rows": results}
