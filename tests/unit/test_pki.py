"""meshjoin.pki: renewal timing as tables of named scenarios, CSR validation as a table of refusals,
and certificates over a VM's own key checked by cryptography and by `openssl verify` against CAs
built by the sandbox."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshjoin import pki
from meshjoin.pki import CaMaterialError, load_ca_bundle, needs_renewal, renewal_time
from meshjoin_sandbox.ca import make_plugin_ca, make_rotated_ca

from .vm_keys import csr_pem, ec_key, private_pem, rsa_key, secrets_of, tampered_csr_pem

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)
H = timedelta(hours=1)
SPIFFE = "spiffe://cluster.local/ns/vms/sa/payments"


# --- renewal timing --------------------------------------------------------------------------

# (id, not_before, not_after, renew_fraction, jitter_fraction, jitter_key, earliest, latest)
RENEWAL_TIME_CASES = [
    ("half-life, no jitter", T0, T0 + DAY, 0.5, 0.0, "vm-a", T0 + 12 * H, T0 + 12 * H),
    ("two-thirds, no jitter", T0, T0 + 3 * H, 2 / 3, 0.0, "vm-a", T0 + 2 * H, T0 + 2 * H),
    ("jitter pulls earlier, never later", T0, T0 + DAY, 0.5, 0.1, "vm-a", T0 + 12 * H - 0.1 * DAY, T0 + 12 * H),
    ("renew at expiry", T0, T0 + DAY, 1.0, 0.0, "vm-a", T0 + DAY, T0 + DAY),
    ("large jitter clamped to not_before", T0, T0 + DAY, 0.1, 0.9, "vm-a", T0, T0 + 0.1 * DAY),
    ("tiny lifetime (1 s)", T0, T0 + timedelta(seconds=1), 0.5, 0.2, "vm-a", T0, T0 + timedelta(seconds=0.5)),
    ("tiny lifetime (1 us)", T0, T0 + timedelta(microseconds=1), 0.5, 0.5, "vm-a", T0, T0 + timedelta(microseconds=1)),
    ("never valid: due at not_after", T0, T0, 0.5, 0.1, "vm-a", T0, T0),
]


@pytest.mark.parametrize(
    "not_before, not_after, renew_fraction, jitter_fraction, key, earliest, latest",
    [c[1:] for c in RENEWAL_TIME_CASES],
    ids=[c[0] for c in RENEWAL_TIME_CASES],
)
def test_renewal_time(not_before, not_after, renew_fraction, jitter_fraction, key, earliest, latest):
    at = renewal_time(
        not_before, not_after, renew_fraction=renew_fraction, jitter_fraction=jitter_fraction, jitter_key=key
    )
    assert earliest <= at <= latest


# (id, not_before, not_after, now, jitter_fraction, expected)
NEEDS_RENEWAL_CASES = [
    ("fresh cert", T0, T0 + DAY, T0 + timedelta(minutes=1), 0.1, False),
    ("just before 50%", T0, T0 + DAY, T0 + 12 * H - timedelta(microseconds=1), 0.0, False),
    ("at 50%", T0, T0 + DAY, T0 + 12 * H, 0.0, True),
    ("past the point", T0, T0 + DAY, T0 + 20 * H, 0.1, True),
    ("past the point plus any jitter", T0, T0 + DAY, T0 + 12 * H, 0.1, True),
    ("already expired", T0, T0 + DAY, T0 + 2 * DAY, 0.1, True),
    ("expires exactly now", T0, T0 + DAY, T0 + DAY, 0.0, True),
    # The minting host's clock ran ahead: the cert is young, not broken.
    ("clock skew: not_before in the future", T0 + timedelta(minutes=3), T0 + DAY, T0, 0.1, False),
    ("never valid", T0, T0, T0 - H, 0.1, True),
]


@pytest.mark.parametrize(
    "not_before, not_after, now, jitter_fraction, expected",
    [c[1:] for c in NEEDS_RENEWAL_CASES],
    ids=[c[0] for c in NEEDS_RENEWAL_CASES],
)
def test_needs_renewal(not_before, not_after, now, jitter_fraction, expected):
    got = needs_renewal(
        not_before, not_after, now, renew_fraction=0.5, jitter_fraction=jitter_fraction, jitter_key="vm-a"
    )
    assert got is expected


def test_jitter_stays_within_bounds_and_spreads_a_fleet():
    point, window = T0 + 12 * H, 0.2 * DAY
    times = [
        renewal_time(T0, T0 + DAY, renew_fraction=0.5, jitter_fraction=0.2, jitter_key=f"proj/zone/vm-{i}")
        for i in range(1000)
    ]
    assert all(point - window < t <= point for t in times)
    # A burst-minted fleet must not renew in one burst: the spread covers most of the window.
    assert len(set(times)) > 990
    assert max(times) - min(times) > 0.9 * window


def test_jitter_is_deterministic_per_key():
    def at(key: str) -> datetime:
        return renewal_time(T0, T0 + DAY, renew_fraction=0.5, jitter_fraction=0.1, jitter_key=key)

    assert at("proj/zone/vm-a") == at("proj/zone/vm-a")
    assert at("proj/zone/vm-a") != at("proj/zone/vm-b")


def test_zero_jitter_ignores_key():
    times = {
        renewal_time(T0, T0 + DAY, renew_fraction=0.5, jitter_fraction=0.0, jitter_key=k) for k in ("a", "b", "c")
    }
    assert times == {T0 + 12 * H}


@pytest.mark.parametrize(
    "renew_fraction, jitter_fraction",
    [(0.0, 0.1), (1.5, 0.1), (0.5, -0.1), (0.5, 1.0)],
    ids=["renew at 0", "renew past 1", "negative jitter", "jitter of whole life"],
)
def test_renewal_settings_are_validated(renew_fraction, jitter_fraction):
    with pytest.raises(ValueError):
        renewal_time(T0, T0 + DAY, renew_fraction=renew_fraction, jitter_fraction=jitter_fraction, jitter_key="k")


def test_needs_renewal_rejects_naive_now():
    with pytest.raises(ValueError, match="timezone-aware"):
        needs_renewal(T0, T0 + DAY, datetime(2030, 1, 1), renew_fraction=0.5, jitter_fraction=0.0, jitter_key="k")


# --- CA material ---------------------------------------------------------------------------


def _read(d: Path) -> dict[str, bytes]:
    names = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
    return {n: (d / n).read_bytes() for n in names}


def _load(files: dict[str, bytes]) -> pki.CaBundle:
    return load_ca_bundle(files["ca-cert.pem"], files["ca-key.pem"], files["cert-chain.pem"], files["root-cert.pem"])


@pytest.fixture(scope="module")
def ca_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cas")
    dirs = {
        "ecdsa": base / "ecdsa",
        "rsa": base / "rsa",
        "other": base / "other",
        "short": base / "short",
        "rotated": base / "rotated",
    }
    make_plugin_ca(dirs["ecdsa"], now=T0)
    make_plugin_ca(dirs["rsa"], now=T0, key_algorithm="rsa-2048", root_name="rsa root")
    make_plugin_ca(dirs["other"], now=T0, root_name="other root")
    make_plugin_ca(dirs["short"], now=T0, intermediate_validity=2 * DAY)
    make_rotated_ca(dirs["rotated"], dirs["ecdsa"], now=T0)
    return dirs


@pytest.fixture(scope="module")
def bundles(ca_dirs) -> dict[str, pki.CaBundle]:
    return {name: _load(_read(d)) for name, d in ca_dirs.items()}


def test_load_ca_bundle_keeps_istio_shapes(ca_dirs, bundles):
    files, bundle = _read(ca_dirs["ecdsa"]), bundles["ecdsa"]
    assert bundle.cert_chain_pem == files["cert-chain.pem"].decode()
    assert bundle.root_certs_pem == files["root-cert.pem"].decode()
    assert bundle.ca_cert == x509.load_pem_x509_certificate(files["ca-cert.pem"])


def test_load_ca_bundle_accepts_chain_without_ca_cert(ca_dirs):
    files = _read(ca_dirs["ecdsa"])
    root_only = dict(files, **{"cert-chain.pem": files["root-cert.pem"]})
    assert _load(root_only).cert_chain_pem == files["cert-chain.pem"].decode()


def test_load_ca_bundle_accepts_root_as_ca(ca_dirs):
    d = ca_dirs["ecdsa"]
    root = (d / "root-cert.pem").read_bytes()
    bundle = load_ca_bundle(root, (d / "root-key.pem").read_bytes(), b"", root)
    assert bundle.cert_chain_pem == root.decode()


def test_load_ca_bundle_accepts_rotation_roots(ca_dirs, bundles):
    # root-cert.pem of a rotating CA holds the new root and the old one.
    assert len(x509.load_pem_x509_certificates(bundles["rotated"].root_certs_pem.encode())) == 2
    assert bundles["ecdsa"].root_certs_pem in bundles["rotated"].root_certs_pem


def _leaf_as_ca(ca_dirs) -> dict[str, bytes]:
    files = _read(ca_dirs["ecdsa"])
    key = ec_key()
    leaf = pki.certify(_load(files), key.public_key(), SPIFFE, T0, DAY)
    return dict(files, **{"ca-cert.pem": leaf.cert_pem.encode(), "ca-key.pem": private_pem(key).encode()})


def _swap(name: str, donor: str):
    def build(ca_dirs):
        return dict(_read(ca_dirs["ecdsa"]), **{name: _read(ca_dirs[donor])[name]})

    return build


def _replace(name: str, content: bytes):
    return lambda ca_dirs: dict(_read(ca_dirs["ecdsa"]), **{name: content})


BROKEN_KEY = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"

BAD_CA_CASES = [
    ("key from another CA", _swap("ca-key.pem", "other"), "ca-key.pem does not match"),
    ("root from another CA", _swap("root-cert.pem", "other"), "not a root in root-cert.pem"),
    ("chain from another CA", _swap("cert-chain.pem", "other"), "cert-chain.pem is broken"),
    ("leaf posing as CA", _leaf_as_ca, "not a CA certificate"),
    ("key not PEM", _replace("ca-key.pem", BROKEN_KEY), "not an unencrypted PEM private key"),
    ("cert not PEM", _replace("ca-cert.pem", b"garbage"), "ca-cert.pem: not PEM"),
    ("empty root-cert.pem", _replace("root-cert.pem", b""), "holds no certificate"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in BAD_CA_CASES], ids=[c[0] for c in BAD_CA_CASES])
def test_load_ca_bundle_refuses(ca_dirs, build, message):
    files = build(ca_dirs)
    with pytest.raises(CaMaterialError, match=message) as err:
        _load(files)
    key_body = files["ca-key.pem"].decode().splitlines()[1]
    for text in (str(err.value), repr(err.value)):
        assert "PRIVATE KEY" not in text
        assert key_body not in text


def test_ca_fingerprint_is_short_stable_and_changes_with_the_ca(ca_dirs, bundles):
    fp = pki.ca_fingerprint(bundles["ecdsa"])
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == pki.ca_fingerprint(_load(_read(ca_dirs["ecdsa"])))
    assert fp != pki.ca_fingerprint(bundles["rotated"])


def test_bundle_roots_dedupes_in_order(bundles):
    old, other = bundles["ecdsa"].root_certs_pem, bundles["other"].root_certs_pem
    assert pki.bundle_roots(old, old + other, "", other) == old + other
    assert pki.bundle_roots(other, bundles["rotated"].root_certs_pem).count("BEGIN CERTIFICATE") == 3
    assert pki.bundle_roots() == ""


# --- workload certificates -----------------------------------------------------------------


def test_spiffe_id():
    assert pki.spiffe_id("cluster.local", "vms", "payments") == SPIFFE
    with pytest.raises(ValueError):
        pki.spiffe_id("cluster.local", "a/b", "payments")


@pytest.mark.parametrize(
    "ca_name, make_key",
    [("ecdsa", ec_key), ("ecdsa", rsa_key), ("rsa", ec_key), ("rsa", rsa_key)],
    ids=["ecdsa CA, ecdsa leaf", "ecdsa CA, rsa leaf", "rsa CA, ecdsa leaf", "rsa CA, rsa leaf"],
)
def test_certify_is_istio_shaped_over_the_vms_own_key(bundles, ca_name, make_key):
    ca = bundles[ca_name]
    now = T0 + 7 * DAY
    vm_key = make_key()
    issued = pki.certify(ca, vm_key.public_key(), SPIFFE, now, DAY)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    ext = cert.extensions

    assert cert.version == x509.Version.v3
    assert cert.subject == x509.Name([])
    assert cert.issuer == ca.ca_cert.subject
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value == x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE)])
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ca_ski = ca.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)

    cert.verify_directly_issued_by(ca.ca_cert)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert vm_key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    assert issued.key_id == pki.key_id(vm_key.public_key()) == pki.chain_key_id(issued.chain_pem)

    assert issued.not_before == cert.not_valid_before_utc == now - timedelta(minutes=5)
    assert issued.not_after == cert.not_valid_after_utc == now + DAY
    assert issued.serial == cert.serial_number > 0
    assert issued.spiffe_id == SPIFFE
    # The leaf, then the CA's chain without its root: the root is meshjoin-root-cert's (root-cert.pem), once.
    assert issued.chain_pem == issued.cert_pem + ca.issuers_pem
    chain = x509.load_pem_x509_certificates(issued.chain_pem.encode())
    roots = x509.load_pem_x509_certificates(ca.root_certs_pem.encode())
    assert not set(chain) & set(roots)
    assert chain[1:] + [c for c in x509.load_pem_x509_certificates(ca.cert_chain_pem.encode()) if c in roots] == \
        x509.load_pem_x509_certificates(ca.cert_chain_pem.encode())
    assert issued.root_pem == ca.root_certs_pem
    assert "PRIVATE KEY" not in issued.chain_pem + repr(issued)


def test_key_id_is_the_first_16_hex_of_sha256_over_der_spki():
    key = ec_key()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pki.key_id(key.public_key()) == hashlib.sha256(spki).hexdigest()[:16]
    assert pki.key_id(ec_key().public_key()) != pki.key_id(key.public_key())
    assert pki.chain_key_id("") is None and pki.chain_key_id("not pem") is None


def test_serials_are_fresh_per_certificate_of_the_same_key(bundles):
    public = ec_key().public_key()
    a = pki.certify(bundles["ecdsa"], public, SPIFFE, T0 + DAY, DAY)
    b = pki.certify(bundles["ecdsa"], public, SPIFFE, T0 + DAY, DAY)
    assert a.serial != b.serial and a.key_id == b.key_id


@pytest.mark.parametrize("ca_name", ["ecdsa", "rsa", "rotated"])
def test_chain_verifies_with_openssl(tmp_path, bundles, ca_name):
    now = T0 + 30 * DAY
    issued = pki.certify(bundles[ca_name], ec_key().public_key(), SPIFFE, now, DAY)
    (tmp_path / "root.pem").write_text(issued.root_pem)
    (tmp_path / "chain.pem").write_text(issued.chain_pem)
    (tmp_path / "leaf.pem").write_text(issued.cert_pem)
    for purpose in ("sslserver", "sslclient"):
        result = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-attime", str(int(now.timestamp())),
             "-CAfile", "root.pem", "-untrusted", "chain.pem", "leaf.pem"],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "leaf.pem: OK"


def test_not_after_is_clamped_to_ca_expiry(bundles):
    ca = bundles["short"]
    issued = pki.certify(ca, ec_key().public_key(), SPIFFE, T0 + DAY, 30 * DAY)
    assert issued.not_after == ca.ca_cert.not_valid_after_utc


def test_expired_ca_cannot_issue(bundles):
    ca = bundles["short"]
    with pytest.raises(CaMaterialError, match="expired"):
        pki.certify(ca, ec_key().public_key(), SPIFFE, ca.ca_cert.not_valid_after_utc, DAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ttl": timedelta(0)}, "ttl must be positive"),
        ({"public_key": ed25519.Ed25519PrivateKey.generate().public_key()}, "EC or RSA public key"),
        ({"spiffe": "cluster.local/ns/a/sa/b"}, "not a SPIFFE ID"),
        ({"now": datetime(2030, 1, 2)}, "timezone-aware"),
    ],
    ids=["zero ttl", "ed25519 key", "not a SPIFFE ID", "naive now"],
)
def test_certify_rejects_bad_arguments(bundles, kwargs, message):
    args = dict(ca=bundles["ecdsa"], public_key=ec_key().public_key(), spiffe=SPIFFE, now=T0 + DAY, ttl=DAY) | kwargs
    with pytest.raises(ValueError, match=message):
        pki.certify(**args)


def test_cert_info_reads_back_the_leaf(bundles):
    ca = bundles["ecdsa"]
    issued = pki.certify(ca, ec_key().public_key(), SPIFFE, T0 + DAY, DAY)
    info = pki.cert_info(issued.chain_pem)
    assert info == (issued.not_before, issued.not_after, SPIFFE, pki.ca_fingerprint(ca))
    assert pki.cert_info(issued.cert_pem).issuer_fingerprint is None
    with pytest.raises(ValueError):
        pki.cert_info("")
    with pytest.raises(ValueError):
        pki.cert_info("not a pem")


def test_reprs_hide_the_ca_key(ca_dirs, bundles):
    key_body = _read(ca_dirs["ecdsa"])["ca-key.pem"].decode().splitlines()[1]
    for text in (repr(bundles["ecdsa"]), str(bundles["ecdsa"])):
        assert "PRIVATE KEY" not in text and key_body not in text


def test_the_product_mints_no_vm_keys():
    # Issue 14: no private key of a VM may exist in meshjoin; only the CA's key is ever loaded.
    assert not hasattr(pki, "issue_workload_cert") and not hasattr(pki, "WorkloadCert")
    assert "key_pem" not in {f.name for f in dataclasses.fields(pki.IssuedCert)}
    source = Path(pki.__file__).read_text()
    assert "generate_private_key" not in source and "private_bytes" not in source


# --- CSRs: what a VM hands in -----------------------------------------------------------------


def _two_csrs(_key) -> str:
    return csr_pem(ec_key()) + csr_pem(ec_key())


def _csr_plus_key(key) -> str:
    return csr_pem(key) + private_pem(key)


CSR_REFUSALS = [
    ("empty", lambda key: "", "empty"),
    ("not PEM", lambda key: "hello", "not PEM"),
    ("PEM of a certificate", lambda key: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
     "other blocks than one CERTIFICATE REQUEST"),
    ("garbage inside the PEM armour",
     lambda key: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a parsable"),
    ("two CSRs", _two_csrs, "2 CSRs where exactly one"),
    ("a private key beside the CSR", _csr_plus_key, "other blocks"),
    ("wrong signature (no proof of possession)", tampered_csr_pem, "signature does not verify"),
    ("RSA when EC P-256 is required", lambda key: csr_pem(rsa_key()), "RSA 2048; MESHJOIN_KEY_ALGORITHM=ecdsa-p256"),
    ("EC P-384 when P-256 is required", lambda key: csr_pem(ec_key(ec.SECP384R1())), "EC secp384r1"),
    ("huge input", lambda key: csr_pem(key) + "#" * 4096, "more than 4096"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in CSR_REFUSALS], ids=[c[0] for c in CSR_REFUSALS])
def test_parse_csr_refuses(build, message):
    key = ec_key()
    text = build(key)
    with pytest.raises(pki.CsrError, match=re.escape(message)) as err:
        pki.parse_csr(text, "ecdsa-p256")
    for secret in secrets_of(key):  # the reason goes to the VM's status and logs: never key bytes
        assert secret not in str(err.value)
    assert "PRIVATE KEY" not in str(err.value).replace("never send a private key", "")


def test_parse_csr_accepts_p256_and_proves_possession():
    key = ec_key()
    verified = pki.parse_csr(csr_pem(key), "ecdsa-p256")
    assert verified.key_id == pki.key_id(key.public_key())
    assert pki.parse_csr(csr_pem(key).encode(), "ecdsa-p256").key_id == verified.key_id  # bytes as well


@pytest.mark.parametrize("bits, ok", [(2048, True), (3072, True), (4096, True), (1024, False)])
def test_rsa_setting_allows_rsa_2048_to_4096_only(bits, ok):
    pem = csr_pem(rsa_key(bits))
    if ok:
        assert pki.parse_csr(pem, "rsa-2048").key_id
    else:
        with pytest.raises(pki.CsrError, match="RSA keys of 2048 to 4096 bits only"):
            pki.parse_csr(pem, "rsa-2048")
    with pytest.raises(pki.CsrError, match="ecdsa-p256 allows EC P-256 keys only"):
        pki.parse_csr(pem, "ecdsa-p256")
    with pytest.raises(pki.CsrError, match="rsa-2048 allows RSA"):
        pki.parse_csr(csr_pem(ec_key()), "rsa-2048")


def test_names_in_the_csr_are_ignored(bundles):
    key = ec_key()
    greedy = csr_pem(key, common_name="istiod.istio-system.svc",
                     uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",), dns=("istiod.istio-system.svc",))
    verified = pki.parse_csr(greedy, "ecdsa-p256")
    issued = pki.certify(bundles["ecdsa"], verified.public_key, SPIFFE, T0 + DAY, DAY)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SPIFFE)]  # what policy granted, nothing the CSR asked
