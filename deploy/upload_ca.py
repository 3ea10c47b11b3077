#!/usr/bin/env python3
"""Put an Istio plug-in CA directory into meshjoin's four secrets, after checking it is whole.

    .venv/bin/python deploy/upload_ca.py --project my-project cacerts/        # check, then upload
    .venv/bin/python deploy/upload_ca.py --project my-project cacerts/ --dry-run

The directory holds what Istio's tools/certs Makefile (or `istioctl`) writes for `cacerts`:
ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem. It is refused, before anything is
uploaded, when the key does not belong to the certificate, the certificate may not sign, the
chain does not link signature by signature to a root in root-cert.pem, or the CA is expired.
A refused CA in Secret Manager would only surface later as every VM failing to join.

Each file becomes a new version of its secret (created if missing); a file equal to the secret's
latest version is skipped, so running this twice changes nothing. The order is root-cert,
cert-chain, ca-key, ca-cert: a new root is trusted before anything signed under it is served.
Function instances pick the new versions up within MESHJOIN_CA_CACHE; a VM reconciled in the
few seconds between the key and the cert upload reports an error and is fixed by the next sweep.

Independent of the meshjoin package on purpose (an operator's machine needs only `cryptography`
and `gcloud`); its checks mirror meshjoin.pki.load_ca_bundle, which the functions apply.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# File in the CA directory → the flag naming its secret and the secret's default id (README).
FILES = {
    "root-cert.pem": ("root_secret", "istio-root-cert"),
    "cert-chain.pem": ("chain_secret", "istio-cert-chain"),
    "ca-key.pem": ("key_secret", "istio-ca-key"),
    "ca-cert.pem": ("cert_secret", "istio-ca-cert"),
}
# Not managed-by=meshjoin: that label marks the per-VM secrets the maintenance sweep may prune.
SECRET_LABELS = "meshjoin-role=plugin-ca"
EXPIRY_WARNING = timedelta(days=30)


class Refused(Exception):
    """The directory is not a usable plug-in CA; nothing was uploaded."""


@dataclass(frozen=True)
class Checked:
    subject: str
    not_after: datetime
    roots: int
    warnings: tuple[str, ...]


def check_ca_dir(directory: Path, now: datetime | None = None) -> Checked:
    """Parse and cross-check the four files; `Refused` says what is wrong, naming the file."""
    now = now or datetime.now(timezone.utc)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise Refused(f"{directory}: missing {', '.join(missing)}")
    warnings: list[str] = []

    ca_certs = _certs(directory / "ca-cert.pem")
    if len(ca_certs) != 1:
        raise Refused(f"ca-cert.pem must hold exactly one certificate, found {len(ca_certs)}")
    ca_cert = ca_certs[0]
    key = _private_key(directory / "ca-key.pem")
    if _spki(key.public_key()) != _spki(ca_cert.public_key()):
        raise Refused("ca-key.pem does not match the public key in ca-cert.pem")
    if not _is_ca(ca_cert):
        raise Refused("ca-cert.pem is not a CA certificate (BasicConstraints ca=True, keyCertSign)")
    if ca_cert.not_valid_after_utc <= now:
        raise Refused(f"ca-cert.pem expired on {ca_cert.not_valid_after_utc.isoformat()}")
    if ca_cert.not_valid_before_utc > now:
        raise Refused(f"ca-cert.pem is not valid before {ca_cert.not_valid_before_utc.isoformat()}")
    if ca_cert.not_valid_after_utc - now < EXPIRY_WARNING:
        warnings.append(f"ca-cert.pem expires on {ca_cert.not_valid_after_utc.isoformat()}")

    roots = _certs(directory / "root-cert.pem")
    if not roots:
        raise Refused("root-cert.pem holds no certificate")
    for root in roots:
        if not _self_signed(root):
            raise Refused(f"root-cert.pem: {_name(root)!r} is not a self-signed root")

    chain = _certs(directory / "cert-chain.pem")
    # Istio's tooling writes ca-cert + its issuers; meshjoin also accepts a chain without the
    # ca cert (and normalises it), so accept the same here.
    if not chain or chain[0] != ca_cert:
        chain.insert(0, ca_cert)
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise Refused(f"cert-chain.pem is broken: {_name(child)!r} is not signed by {_name(parent)!r}") from None
    if chain[-1] not in roots:
        raise Refused(f"cert-chain.pem ends at {_name(chain[-1])!r}, which is not a root in root-cert.pem")

    mode = (directory / "ca-key.pem").stat().st_mode
    if mode & 0o077:
        warnings.append(f"ca-key.pem is readable by others (mode {mode & 0o777:o}); consider chmod 600")
    return Checked(_name(ca_cert), ca_cert.not_valid_after_utc, len(roots), tuple(warnings))


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        if b"-----BEGIN" not in path.read_bytes():
            return []
        raise Refused(f"{path.name}: not PEM certificates") from None


def _private_key(path: Path):
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Refused(f"{path.name}: not an unencrypted PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise Refused(f"{path.name}: unsupported key type {type(key).__name__}; use RSA or EC")
    return key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


# --- gcloud ----------------------------------------------------------------------------------


class Gcloud:
    """The few `gcloud secrets` calls the upload needs; the binary comes from PATH."""

    def __init__(self, project: str, binary: str = "gcloud"):
        self.project = project
        self.binary = binary

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [self.binary, *args, f"--project={self.project}", "--quiet"]
        result = subprocess.run(command, capture_output=True)
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"`gcloud {' '.join(args[:3])} ...` failed ({result.returncode}): {stderr[-500:]}")
        return result

    def exists(self, secret: str) -> bool:
        return self._run("secrets", "describe", secret, "--format=value(name)", check=False).returncode == 0

    def create(self, secret: str) -> None:
        self._run("secrets", "create", secret, "--replication-policy=automatic", f"--labels={SECRET_LABELS}")

    def latest(self, secret: str) -> bytes | None:
        """The latest version's data, or None when there is none (or we may not read it)."""
        result = self._run("secrets", "versions", "access", "latest", f"--secret={secret}", check=False)
        return result.stdout if result.returncode == 0 else None

    def add_version(self, secret: str, path: Path) -> None:
        self._run("secrets", "versions", "add", secret, f"--data-file={path}")


def upload(directory: Path, secrets: dict[str, str], gcloud: Gcloud, out=sys.stdout) -> int:
    """Add a version for each file that differs from its secret's latest; returns how many were added."""
    added = 0
    for filename, secret in secrets.items():
        path = directory / filename
        if not gcloud.exists(secret):
            gcloud.create(secret)
            print(f"created secret {secret}", file=out)
        elif gcloud.latest(secret) == path.read_bytes():
            print(f"{secret}: unchanged ({filename})", file=out)
            continue
        gcloud.add_version(secret, path)
        added += 1
        print(f"{secret}: new version from {filename}", file=out)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the plug-in CA directory (ca-cert.pem, ca-key.pem, ...)")
    parser.add_argument("--project", default=os.environ.get("MESHJOIN_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT"),
                        help="project holding the secrets (default: $MESHJOIN_PROJECT or $CLOUDSDK_CORE_PROJECT)")
    for filename, (dest, default) in FILES.items():
        env = f"MESHJOIN_CA_{dest.split('_')[0].upper()}_SECRET"
        parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=os.environ.get(env) or default,
                            help=f"secret for {filename} (default: ${env} or {default})")
    parser.add_argument("--dry-run", action="store_true", help="check the directory and show the plan; call nothing")
    args = parser.parse_args(argv)
    if not args.project:
        parser.error("--project is required (or set MESHJOIN_PROJECT)")

    try:
        checked = check_ca_dir(args.directory)
    except Refused as exc:
        print(f"upload_ca: refused, nothing uploaded: {exc}", file=sys.stderr)
        return 2
    for warning in checked.warnings:
        print(f"upload_ca: warning: {warning}", file=sys.stderr)
    print(f"CA {checked.subject!r} valid until {checked.not_after.isoformat()}, {checked.roots} root(s) trusted")

    secrets = {filename: getattr(args, dest) for filename, (dest, _) in FILES.items()}
    if args.dry_run:
        for filename, secret in secrets.items():
            print(f"would upload {filename} to projects/{args.project}/secrets/{secret}")
        return 0
    try:
        added = upload(args.directory, secrets, Gcloud(args.project))
    except (OSError, RuntimeError) as exc:
        print(f"upload_ca: {exc}", file=sys.stderr)
        return 1
    print(f"{added} new version(s); functions pick them up within MESHJOIN_CA_CACHE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
