"""What a VM's agent does with its own key, for tests: make a key, write a CSR for it.

The product never makes a VM's key (issue 14); these helpers stand in for `openssl genpkey` and
`openssl req` on the VM. Tests keep the private key to check that it never reaches meshjoin.
"""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def csr_pem(key, *, common_name: str | None = None, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> str:
    """A PKCS#10 request for `key`, asking for whatever names the caller (a hostile VM owner) likes."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []))
    sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def tampered_csr_pem(key) -> str:
    """A CSR whose signature does not verify with its public key (the last signature byte flipped)."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem(key).encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def private_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def secrets_of(key) -> list[str]:
    """Strings that would betray the private key if found anywhere outside the VM: its whole PEM, its DER
    (base64, as one string and as PEM body), and its private numbers (hex, decimal, base64). The PEM's body
    lines alone would not do: they carry the public key too, which a certificate rightly holds."""
    pem = private_pem(key)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    b64 = base64.b64encode(der).decode()
    numbers = key.private_numbers()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        private = [numbers.private_value]
        size = (key.curve.key_size + 7) // 8
    else:
        private = [numbers.d, numbers.p, numbers.q]
        size = None
    found = [pem, b64, "".join(pem.splitlines()[1:-1])]
    for value in private:
        raw = value.to_bytes(size or (value.bit_length() + 7) // 8, "big")
        found += [format(value, "x"), format(value, "X"), str(value), raw.hex(), base64.b64encode(raw).decode()]
    return found
