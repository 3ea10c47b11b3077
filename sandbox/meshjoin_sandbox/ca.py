"""Throwaway certificate authorities for the sandbox and the tests.

`make_plugin_ca` writes the four files Istio's plug-in CA reads (the same shape as Istio's
`tools/certs` Makefile produces), so the product loads sandbox material exactly as it would
load a real mesh's. `make_tls_ca_and_server` gives the Kubernetes emulator an HTTPS identity
the kubernetes client can verify with a cluster CA, as on GKE.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

YEAR = timedelta(days=365)
# Certificates start an hour in the past so a fresh CA is valid despite small clock differences.
BACKDATE = timedelta(hours=1)


def make_plugin_ca(
    out_dir: Path,
    *,
    root_name: str = "sandbox root",
    now: datetime | None = None,
    key_algorithm: str = "ecdsa-p256",
    root_validity: timedelta = 10 * YEAR,
    intermediate_validity: timedelta = 5 * YEAR,
) -> None:
    """Write ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem for a fresh two-level CA.

    The root signs an intermediate (pathlen 0: it may sign only leaves); the intermediate is the
    plug-in CA. root-key.pem is kept beside them so a test can sign odd certificates if needed.
    """
    now = now or datetime.now(timezone.utc)
    out_dir = Path(out_dir)
    root_key = _new_key(key_algorithm)
    root = _ca_cert(_name(root_name), root_key, _name(root_name), root_key, now, root_validity, None)
    _write_ca(out_dir, root, root_key, [root], key_algorithm, now, intermediate_validity, root_name)


def make_rotated_ca(
    out_dir: Path,
    old_dir: Path,
    *,
    root_name: str = "sandbox root 2",
    now: datetime | None = None,
    key_algorithm: str = "ecdsa-p256",
    include_old_roots: bool = True,
) -> None:
    """Write a plug-in CA under a new root, for CA rotation.

    With `include_old_roots` root-cert.pem carries the new root followed by old_dir's roots:
    the first step of a multi-root rotation, when every workload must trust both.
    """
    now = now or datetime.now(timezone.utc)
    out_dir = Path(out_dir)
    old_roots = x509.load_pem_x509_certificates((Path(old_dir) / "root-cert.pem").read_bytes())
    root_key = _new_key(key_algorithm)
    root = _ca_cert(_name(root_name), root_key, _name(root_name), root_key, now, 10 * YEAR, None)
    trusted = [root] + ([c for c in old_roots if c != root] if include_old_roots else [])
    _write_ca(out_dir, root, root_key, trusted, key_algorithm, now, 5 * YEAR, root_name)


def make_tls_ca_and_server(out_dir: Path, ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A cluster CA and a server cert for `ip` and localhost; returns (ca_pem, cert, key) paths."""
    import ipaddress

    now = datetime.now(timezone.utc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key("ecdsa-p256")
    ca_name = _name("sandbox cluster CA")
    ca = _ca_cert(ca_name, ca_key, ca_name, ca_key, now, 10 * YEAR, None)
    key = _new_key("ecdsa-p256")
    cert = (
        _builder(_name("kube-apiserver"), ca_name, key, now, YEAR)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address(ip)),
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes"),
                    x509.DNSName("kubernetes.default"),
                ]
            ),
            critical=False,
        )
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(ca), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = out_dir / "cluster-ca.pem"
    cert_path = out_dir / "server-cert.pem"
    key_path = out_dir / "server-key.pem"
    ca_path.write_bytes(_cert_pem(ca))
    cert_path.write_bytes(_cert_pem(cert))
    _write_key(key_path, key)
    return ca_path, cert_path, key_path


# --- helpers ---------------------------------------------------------------------------------


def _write_ca(
    out_dir: Path,
    root: x509.Certificate,
    root_key: PrivateKey,
    trusted_roots: list[x509.Certificate],
    key_algorithm: str,
    now: datetime,
    validity: timedelta,
    root_name: str,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key(key_algorithm)
    ca = _ca_cert(_name(f"{root_name} intermediate"), ca_key, root.subject, root_key, now, validity, 0)
    (out_dir / "ca-cert.pem").write_bytes(_cert_pem(ca))
    _write_key(out_dir / "ca-key.pem", ca_key)
    # Istio's tools/certs: cert-chain.pem = ca-cert.pem + root-cert.pem.
    (out_dir / "cert-chain.pem").write_bytes(_cert_pem(ca) + _cert_pem(root))
    (out_dir / "root-cert.pem").write_bytes(b"".join(_cert_pem(c) for c in trusted_roots))
    _write_key(out_dir / "root-key.pem", root_key)


def _ca_cert(
    subject: x509.Name,
    key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    now: datetime,
    validity: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    builder = (
        _builder(subject, issuer, key, now, validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, now: datetime, validity: timedelta):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature content_commitment key_encipherment data_encipherment key_agreement "
        "key_cert_sign crl_sign encipher_only decipher_only"
    ).split()
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names})


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshjoin sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key(algorithm: str) -> PrivateKey:
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key algorithm {algorithm!r}")


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start: even sandbox keys should not be world-readable for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
