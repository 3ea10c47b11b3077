"""Workload certificates for VMs joining the mesh: the VM's own key, certified by the plug-in CA.

Each VM makes its private key itself and hands meshjoin a PKCS#10 CSR (`parse_csr` checks it and the
proof of possession); meshjoin signs the CSR's public key with the identity policy grants (`certify`).
No private key of a VM exists here, ever: the only private key this module touches is the CA's.

Pure: no I/O and no clock. Callers pass PEM bytes in and the current time as `now`, so every
decision here (what to certify, when to renew) is a function of its arguments and table-testable.

Key material never reaches an exception message or a repr: errors name the file and the
problem, and the CA key is hidden from `repr`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import CaMaterialError, CsrError

CaPrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]
WorkloadPublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]

# What a VM's agent generates (metadata meshjoin-key-algorithm) and what a CSR's key may be.
KEY_ALGORITHMS = ("ecdsa-p256", "rsa-2048")
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
FINGERPRINT_CHARS = 16  # 64 bits: plenty to notice a CA change, short enough for a label value.
KEY_ID_CHARS = 16
# A P-256 CSR is ~400 bytes of PEM and an RSA 4096 one ~1.7 kB; guest attribute values are small.
MAX_CSR_BYTES = 4096
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


@dataclass(frozen=True)
class CaBundle:
    """A validated plug-in CA: the signing cert and key, plus what workloads must carry and trust."""

    ca_cert: x509.Certificate
    # Hidden from repr, and left out of equality: the key is fixed by ca_cert (load checks they match).
    ca_key: CaPrivateKey = field(repr=False, compare=False)
    cert_chain_pem: str = ""  # ca-cert first, then its issuers up to the root (Istio's cert-chain.pem)
    root_certs_pem: str = ""  # root-cert.pem: one or more roots (several during a rotation)
    # cert_chain_pem without its root: what follows a leaf in `meshjoin-cert-chain`. The root is already in
    # `meshjoin-root-cert` (and root-cert.pem on the VM), and TLS peers verify against their own roots, so a
    # served chain need not carry it (RFC 8446 4.4.2); leaving it out keeps a VM's metadata within 4 kB.
    issuers_pem: str = ""


@dataclass(frozen=True)
class IssuedCert:
    """A leaf meshjoin signed for a VM's own key: public, delivered in instance metadata."""

    cert_pem: str  # the leaf alone
    chain_pem: str  # -> metadata meshjoin-cert-chain, the VM's cert-chain.pem: leaf followed by the CA's chain
    root_pem: str  # -> root-cert.pem
    not_before: datetime
    not_after: datetime
    serial: int
    spiffe_id: str
    key_id: str  # of the certified public key


class CertInfo(NamedTuple):
    """The renewal-relevant facts of a stored chain's leaf."""

    not_before: datetime
    not_after: datetime
    spiffe_id: str | None  # first URI SAN of the leaf
    issuer_fingerprint: str | None  # fingerprint of the cert after the leaf, if the chain holds one


# --- CA material -----------------------------------------------------------------------------


def load_ca_bundle(
    ca_cert_pem: bytes, ca_key_pem: bytes, cert_chain_pem: bytes, root_cert_pem: bytes
) -> CaBundle:
    """Parse and cross-check Istio's four plug-in CA files.

    Checks that the key belongs to the cert, that the cert may sign certificates, and that the
    chain links signature by signature to a root in root-cert.pem: issuing leaves that the mesh
    cannot verify would only fail later, on the VM, far from the cause.
    """
    ca_cert = _one_cert(ca_cert_pem, "ca-cert.pem")
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is generic, but keep even that out: only the file and the problem.
        raise CaMaterialError("ca-key.pem: not an unencrypted PEM private key") from None
    if not isinstance(ca_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CaMaterialError(f"ca-key.pem: unsupported key type {type(ca_key).__name__}; use RSA or EC")
    if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
        raise CaMaterialError("ca-key.pem does not match the public key in ca-cert.pem")

    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaMaterialError("ca-cert.pem is not a CA certificate (BasicConstraints ca=True missing)")
    try:
        ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise CaMaterialError("ca-cert.pem KeyUsage does not allow keyCertSign")

    roots = _certs(root_cert_pem, "root-cert.pem")
    if not roots:
        raise CaMaterialError("root-cert.pem holds no certificate")
    chain = _certs(cert_chain_pem, "cert-chain.pem")
    # Istio's tooling writes cert-chain.pem as ca-cert + issuers; accept a chain that omits the
    # ca cert (or an empty one for a root used directly) and normalise to the tooling's shape.
    if not chain or chain[0] != ca_cert:
        chain.insert(0, ca_cert)
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CaMaterialError(
                f"cert-chain.pem is broken: {child.subject.rfc4514_string()!r} "
                f"is not signed by {parent.subject.rfc4514_string()!r}"
            ) from None
    if chain[-1] not in roots:
        raise CaMaterialError(
            f"cert-chain.pem ends at {chain[-1].subject.rfc4514_string()!r}, "
            "which is not a root in root-cert.pem"
        )

    return CaBundle(
        ca_cert=ca_cert,
        ca_key=ca_key,
        cert_chain_pem=_pem(chain),
        root_certs_pem=_pem(roots),
        issuers_pem=_pem([cert for cert in chain if cert not in roots]),
    )


def ca_fingerprint(bundle: CaBundle) -> str:
    """Short, stable id of the signing CA cert: a change means leaves must be re-issued."""
    return cert_fingerprint(bundle.ca_cert)


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:FINGERPRINT_CHARS]


def bundle_roots(*pems: str) -> str:
    """Concatenate root certificates without duplicates, first occurrence first.

    During a CA rotation workloads must trust the old and the new root at once; the inputs
    overlap (each may already be a bundle), so dedupe by DER rather than by text.
    """
    seen: list[x509.Certificate] = []
    for text in pems:
        for cert in _certs(text.encode(), "root certificates", error=ValueError):
            if cert not in seen:
                seen.append(cert)
    return _pem(seen)


# --- Workload certificates -------------------------------------------------------------------


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's workload identity: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""
    parts = {"trust_domain": trust_domain, "namespace": namespace, "service_account": service_account}
    for name, value in parts.items():
        if not value or "/" in value:
            raise ValueError(f"{name} must be non-empty and contain no '/': {value!r}")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class VerifiedCsr:
    """A CSR whose signature verified: its signer holds the private key of `public_key`."""

    public_key: WorkloadPublicKey
    key_id: str


def key_id(public_key: WorkloadPublicKey) -> str:
    """Short id of a public key: the first 16 hex digits of SHA-256 over its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(_spki(public_key)).hexdigest()[:KEY_ID_CHARS]


def parse_csr(pem: str | bytes, allowed_algorithm: str) -> VerifiedCsr:
    """Validate the PKCS#10 request a VM's agent wrote; raises CsrError with the reason.

    Exactly one PEM `CERTIFICATE REQUEST` block and nothing else, at most MAX_CSR_BYTES; a valid
    self-signature (proof that the VM holds the private key); a key of the type the deployment allows
    (`ecdsa-p256`: EC P-256 only; `rsa-2048`: RSA of 2048 to 4096 bits only). Every name the CSR asks
    for (subject, SANs, extensions) is ignored: `certify` puts in only what policy grants.
    """
    if allowed_algorithm not in KEY_ALGORITHMS:
        raise ValueError(f"allowed_algorithm must be one of {KEY_ALGORITHMS}, got {allowed_algorithm!r}")
    data = pem.encode() if isinstance(pem, str) else bytes(pem)
    if not data.strip():
        raise CsrError("the CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"the CSR is {len(data)} bytes, more than {MAX_CSR_BYTES}")
    blocks = _PEM_BEGIN.findall(data)
    if blocks != [b"CERTIFICATE REQUEST"]:
        if not blocks:
            raise CsrError("not PEM: no -----BEGIN CERTIFICATE REQUEST----- block")
        if blocks.count(b"CERTIFICATE REQUEST") > 1:
            raise CsrError(f"{blocks.count(b'CERTIFICATE REQUEST')} CSRs where exactly one is expected")
        raise CsrError("the PEM text holds other blocks than one CERTIFICATE REQUEST (never send a private key)")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CsrError("the CERTIFICATE REQUEST block is not a parsable PKCS#10 request") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CsrError("the CSR's public key is of an unsupported type") from None
    _check_key_type(public_key, allowed_algorithm)
    try:
        signed = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        raise CsrError("the CSR's signature does not verify with its public key (no proof of possession)")
    return VerifiedCsr(public_key, key_id(public_key))


def _check_key_type(public_key, allowed_algorithm: str) -> None:
    if allowed_algorithm == "ecdsa-p256":
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise CsrError(f"the CSR's key is {_describe_key(public_key)}; MESHJOIN_KEY_ALGORITHM=ecdsa-p256 "
                           "allows EC P-256 keys only")
    elif not isinstance(public_key, rsa.RSAPublicKey) or not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
        raise CsrError(f"the CSR's key is {_describe_key(public_key)}; MESHJOIN_KEY_ALGORITHM=rsa-2048 allows "
                       f"RSA keys of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits only")


def _describe_key(public_key) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    return type(public_key).__name__.lstrip("_")


def certify(
    ca: CaBundle,
    public_key: WorkloadPublicKey,
    spiffe: str,
    now: datetime,
    ttl: timedelta,
    backdate: timedelta = timedelta(minutes=5),
) -> IssuedCert:
    """An Istio-shaped workload leaf for `spiffe` over the VM's own `public_key`, signed by the plug-in CA.

    The leaf mirrors what istiod issues: empty subject, the SPIFFE URI as its only (hence
    critical) SAN, digitalSignature+keyEncipherment, serverAuth+clientAuth. notBefore is
    backdated for VM clock skew; notAfter never outlives the CA, since the chain would fail there.
    meshjoin never sees the private key: the VM made it and proved it holds it (`parse_csr`).
    """
    _require_aware(now, "now")
    if ttl <= timedelta(0):
        raise ValueError(f"ttl must be positive, got {ttl}")
    if not spiffe.startswith("spiffe://"):
        raise ValueError(f"not a SPIFFE ID: {spiffe!r}")
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ValueError(f"public_key must be an EC or RSA public key, got {type(public_key).__name__}")

    not_before = now - backdate
    not_after = min(now + ttl, ca.ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise CaMaterialError(f"ca-cert.pem expired at {ca.ca_cert.not_valid_after_utc.isoformat()}")

    try:
        ca_ski = ca.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.ca_key.public_key())
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(ca.ca_key, hashes.SHA256())
    )

    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return IssuedCert(
        cert_pem=cert_pem,
        chain_pem=cert_pem + ca.issuers_pem,
        root_pem=ca.root_certs_pem,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=serial,
        spiffe_id=spiffe,
        key_id=key_id(public_key),
    )


def chain_key_id(chain_pem: str) -> str | None:
    """`key_id` of the leaf (first certificate) of a cert-chain.pem; None if it holds none."""
    try:
        certs = _certs(chain_pem.encode(), "cert-chain.pem", error=ValueError)
    except ValueError:
        return None
    return key_id(certs[0].public_key()) if certs else None


def cert_info(chain_pem: str) -> CertInfo:
    """Read back the leaf of a stored cert-chain.pem; raises ValueError if there is none."""
    certs = _certs(chain_pem.encode(), "cert-chain.pem", error=ValueError)
    if not certs:
        raise ValueError("cert-chain.pem holds no certificate")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return CertInfo(
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        spiffe_id=uris[0] if uris else None,
        issuer_fingerprint=cert_fingerprint(certs[1]) if len(certs) > 1 else None,
    )


# --- Renewal ---------------------------------------------------------------------------------


def renewal_time(
    not_before: datetime,
    not_after: datetime,
    *,
    renew_fraction: float,
    jitter_fraction: float,
    jitter_key: str,
) -> datetime:
    """When a cert valid over [not_before, not_after] should be renewed.

    At `renew_fraction` of its lifetime, pulled earlier by a per-key jitter in
    [0, jitter_fraction x lifetime). The jitter comes from sha256(jitter_key), not a random
    source: a fleet certified in one burst spreads its renewals (setMetadata writes are
    quota'd) while each VM's renewal point stays the same from one sweep to the next.
    The result lies within [not_before, not_after].
    """
    if not 0.0 < renew_fraction <= 1.0:
        raise ValueError(f"renew_fraction must be in (0, 1], got {renew_fraction}")
    if not 0.0 <= jitter_fraction < 1.0:
        raise ValueError(f"jitter_fraction must be in [0, 1), got {jitter_fraction}")
    lifetime_us = (not_after - not_before) // timedelta(microseconds=1)
    if lifetime_us <= 0:
        return not_after  # never valid: nothing to wait for (needs_renewal says yes at once)
    point_us = round(renew_fraction * lifetime_us)
    # Integer arithmetic keeps the jitter strictly below its bound: h64 / 2**64 is in [0, 1).
    span_us = int(jitter_fraction * lifetime_us)
    h64 = int.from_bytes(hashlib.sha256(jitter_key.encode()).digest()[:8], "big")
    jitter_us = (h64 * span_us) >> 64
    at = not_before + timedelta(microseconds=point_us - jitter_us)
    return max(not_before, min(at, not_after))


def needs_renewal(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    *,
    renew_fraction: float,
    jitter_fraction: float,
    jitter_key: str,
) -> bool:
    """True once `now` reaches the renewal time; always for an expired or never-valid cert.

    A not_before still in the future (the issuing host's clock ahead of ours) is not itself a
    reason to renew: the renewal time is never before not_before, so such a cert is simply young.
    """
    _require_aware(now, "now")
    if now >= not_after or not_after <= not_before:  # expired, or never valid at all
        return True
    at = renewal_time(
        not_before,
        not_after,
        renew_fraction=renew_fraction,
        jitter_fraction=jitter_fraction,
        jitter_key=jitter_key,
    )
    return now >= at


# --- helpers ---------------------------------------------------------------------------------


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _certs(pem: bytes, what: str, error: type[ValueError] = CaMaterialError) -> list[x509.Certificate]:
    """All certificates in a PEM blob (empty list for an empty blob)."""
    if not pem.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise error(f"{what}: not PEM certificates") from None


def _one_cert(pem: bytes, what: str) -> x509.Certificate:
    certs = _certs(pem, what)
    if len(certs) != 1:
        raise CaMaterialError(f"{what}: expected exactly one certificate, found {len(certs)}")
    return certs[0]


def _pem(certs: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
