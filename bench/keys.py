"""ECDSA P-256 vs RSA-2048 workload certificates: issuances per second with the product's own `pki`.

Measured under three plug-in CAs, since the CA's key signs every leaf: the sandbox's (ECDSA P-256),
an RSA-2048 one, and RSA-4096, what Istio's `tools/certs` Makefiles make by default
(ROOTCA_KEYSZ / INTERMEDIATE_KEYSZ ?= 4096).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

from cryptography.hazmat.primitives.asymmetric import rsa

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
            issue = _rate(lambda: pki.issue_workload_cert(bundle, SPIFFE, now=now, ttl=timedelta(hours=24),
                                                          key_algorithm=leaf),
                          seconds, 5)
            keygen = _rate(lambda: pki._new_key(leaf), seconds / 2, 5)
            results.append({"ca": ca_algorithm, "leaf": leaf, "issuance": issue, "keygen": keygen})
    return {"rows": results}
