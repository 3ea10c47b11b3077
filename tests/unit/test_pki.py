"""meshjoin.pki: renewal timing as tables of named scenarios, and minted certs checked by
cryptography and by `openssl verify` against CAs built by the sandbox."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshjoin import pki
from meshjoin.pki import CaMaterialError, load_ca_bundle, needs_renewal, renewal_time
from meshjoin_sandbox.ca import make_plugin_ca, make_rotated_ca

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
    leaf = pki.issue_workload_cert(_load(files), SPIFFE, T0, DAY)
    return dict(files, **{"ca-cert.pem": leaf.cert_pem.encode(), "ca-key.pem": leaf.key_pem.encode()})


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
    "ca_name, key_algorithm",
    [("ecdsa", "ecdsa-p256"), ("ecdsa", "rsa-2048"), ("rsa", "ecdsa-p256"), ("rsa", "rsa-2048")],
    ids=["ecdsa CA, ecdsa leaf", "ecdsa CA, rsa leaf", "rsa CA, ecdsa leaf", "rsa CA, rsa leaf"],
)
def test_issue_workload_cert_is_istio_shaped(bundles, ca_name, key_algorithm):
    ca = bundles[ca_name]
    now = T0 + 7 * DAY
    wc = pki.issue_workload_cert(ca, SPIFFE, now, DAY, key_algorithm=key_algorithm)
    cert = x509.load_pem_x509_certificate(wc.cert_pem.encode())
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
    assert wc.key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(wc.key_pem.encode(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)

    assert wc.not_before == cert.not_valid_before_utc == now - timedelta(minutes=5)
    assert wc.not_after == cert.not_valid_after_utc == now + DAY
    assert wc.serial == cert.serial_number > 0
    assert wc.spiffe_id == SPIFFE
    assert wc.chain_pem == wc.cert_pem + ca.cert_chain_pem
    assert wc.root_pem == ca.root_certs_pem


def test_serials_and_keys_are_fresh_per_issue(bundles):
    a = pki.issue_workload_cert(bundles["ecdsa"], SPIFFE, T0 + DAY, DAY)
    b = pki.issue_workload_cert(bundles["ecdsa"], SPIFFE, T0 + DAY, DAY)
    assert a.serial != b.serial and a.key_pem != b.key_pem


@pytest.mark.parametrize("ca_name", ["ecdsa", "rsa", "rotated"])
def test_chain_verifies_with_openssl(tmp_path, bundles, ca_name):
    now = T0 + 30 * DAY
    wc = pki.issue_workload_cert(bundles[ca_name], SPIFFE, now, DAY)
    (tmp_path / "root.pem").write_text(wc.root_pem)
    (tmp_path / "chain.pem").write_text(wc.chain_pem)
    (tmp_path / "leaf.pem").write_text(wc.cert_pem)
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
    wc = pki.issue_workload_cert(ca, SPIFFE, T0 + DAY, 30 * DAY)
    assert wc.not_after == ca.ca_cert.not_valid_after_utc


def test_expired_ca_cannot_issue(bundles):
    ca = bundles["short"]
    with pytest.raises(CaMaterialError, match="expired"):
        pki.issue_workload_cert(ca, SPIFFE, ca.ca_cert.not_valid_after_utc, DAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ttl": timedelta(0)}, "ttl must be positive"),
        ({"key_algorithm": "dsa"}, "key_algorithm"),
        ({"spiffe": "cluster.local/ns/a/sa/b"}, "not a SPIFFE ID"),
        ({"now": datetime(2030, 1, 2)}, "timezone-aware"),
    ],
    ids=["zero ttl", "unknown key algorithm", "not a SPIFFE ID", "naive now"],
)
def test_issue_rejects_bad_arguments(bundles, kwargs, message):
    args = dict(ca=bundles["ecdsa"], spiffe=SPIFFE, now=T0 + DAY, ttl=DAY) | kwargs
    with pytest.raises(ValueError, match=message):
        pki.issue_workload_cert(**args)


def test_cert_info_reads_back_the_leaf(bundles):
    ca = bundles["ecdsa"]
    wc = pki.issue_workload_cert(ca, SPIFFE, T0 + DAY, DAY)
    info = pki.cert_info(wc.chain_pem)
    assert info == (wc.not_before, wc.not_after, SPIFFE, pki.ca_fingerprint(ca))
    assert pki.cert_info(wc.cert_pem).issuer_fingerprint is None
    with pytest.raises(ValueError):
        pki.cert_info("")
    with pytest.raises(ValueError):
        pki.cert_info("not a pem")


def test_reprs_hide_private_keys(bundles):
    wc = pki.issue_workload_cert(bundles["ecdsa"], SPIFFE, T0 + DAY, DAY)
    key_body = wc.key_pem.splitlines()[1]
    for obj in (bundles["ecdsa"], wc):
        for text in (repr(obj), str(obj)):
            assert "PRIVATE KEY" not in text
            assert key_body not in text
    assert SPIFFE in repr(wc)  # the useful parts are still shown
