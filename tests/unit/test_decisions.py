"""Pure decisions of the reconcile: when a VM needs a certificate, which key is certified, when a new key is
asked for, when it has traces to clean."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin import names, pki
from meshjoin.model import Vm, VmKey
from meshjoin.plan import REKEY_TOKEN, Cause, has_traces, key_to_certify, needs_new_cert, read_csr, rekey_pending, \
    rekey_token
from meshjoin.settings import Settings
from meshjoin.status import Delivered, Status

SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/r/clusters/c",
                    renew_fraction=0.5, renew_jitter_fraction=0.1)
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SPIFFE = "spiffe://cluster.local/ns/default/sa/default"
VM = Vm(VmKey("my-project", "us-central1-a", "vm-1"), "42", {"mesh": "join"}, {}, "fp", "10.0.0.2", "sa@x")
KEY_A, KEY_B = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
GOOD = Delivered(SPIFFE, "42", "ca1", KEY_A, T0, T0 + timedelta(hours=24), "1f", 1)


@pytest.mark.parametrize("delivered, now, force, ca, csr_key, expected", [
    pytest.param(None, T0, False, "ca1", None, Cause.NO_CERT, id="never joined"),
    pytest.param(None, T0, False, "ca1", KEY_A, Cause.NO_CERT, id="never joined, CSR waiting"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca1", None, None, id="fresh cert: nothing to do"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca1", KEY_A, None, id="CSR of the certified key: nothing"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca1", KEY_B, Cause.NEW_KEY, id="new key (rotation)"),
    pytest.param(GOOD, T0 + timedelta(hours=1), True, "ca1", None, Cause.FORCED, id="forced"),
    pytest.param(GOOD, T0 + timedelta(hours=1), True, "ca1", KEY_B, Cause.NEW_KEY, id="forced, but a new key wins"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca2", None, Cause.CA_CHANGED, id="CA rotated"),
    pytest.param(GOOD, T0 + timedelta(hours=1), False, "ca2", KEY_B, Cause.NEW_KEY, id="CA rotated and a new key"),
    pytest.param(GOOD, T0 + timedelta(hours=12, minutes=1), False, "ca1", None, Cause.RENEWAL_DUE,
                 id="past 50% of life"),
    pytest.param(GOOD, T0 + timedelta(hours=9, minutes=30), False, "ca1", None, None,
                 id="before earliest jittered point"),
    pytest.param(GOOD, T0 + timedelta(days=3), False, "ca1", None, Cause.RENEWAL_DUE, id="long expired (VM powered off)"),
    pytest.param(replace(GOOD, instance_id="41"), T0, False, "ca1", None, Cause.RECREATED, id="clone: other instance id"),
    pytest.param(replace(GOOD, instance_id="41"), T0, False, "ca1", KEY_B, Cause.RECREATED,
                 id="clone with its own key: still a first delivery"),
    pytest.param(replace(GOOD, spiffe="spiffe://cluster.local/ns/apps/sa/x"), T0, False, "ca1", None,
                 Cause.IDENTITY_CHANGED, id="identity moved"),
])
def test_needs_new_cert(delivered, now, force, ca, csr_key, expected):
    assert needs_new_cert(delivered, vm=VM, spiffe=SPIFFE, ca_fingerprint=ca, now=now, settings=SETTINGS,
                          csr_key_id=csr_key, force=force) == expected


def _verified(key_id: str) -> pki.VerifiedCsr:
    return pki.VerifiedCsr(public_key=None, key_id=key_id)  # the decision looks at the key id only


@pytest.mark.parametrize("why, recorded, csr, expected", [
    pytest.param(Cause.NO_CERT, None, None, "has not written its CSR", id="first join, no CSR yet"),
    pytest.param(Cause.NO_CERT, None, pki.CsrError("the CSR is empty"), "was refused: the CSR is empty",
                 id="first join, CSR invalid"),
    pytest.param(Cause.NO_CERT, None, KEY_A, KEY_A, id="first join, valid CSR"),
    pytest.param(Cause.RECREATED, replace(GOOD, instance_id="41"), KEY_A, "copied from (instance 41)",
                 id="clone presenting the source VM's key: refused"),
    pytest.param(Cause.RECREATED, replace(GOOD, instance_id="41"), KEY_B, KEY_B, id="clone with a fresh key"),
    pytest.param(Cause.RENEWAL_DUE, GOOD, KEY_A, KEY_A, id="renewal re-certifies the current key"),
    pytest.param(Cause.CA_CHANGED, GOOD, KEY_A, KEY_A, id="CA re-issue re-certifies the current key"),
    pytest.param(Cause.RENEWAL_DUE, GOOD, None, "has not written its CSR", id="renewal without a CSR: nothing signed"),
    pytest.param(Cause.NEW_KEY, GOOD, KEY_B, KEY_B, id="rotation certifies the new key"),
])
def test_key_to_certify(why, recorded, csr, expected):
    csr = _verified(csr) if isinstance(csr, str) else csr
    choice = key_to_certify(why, recorded, csr)
    if isinstance(choice, pki.VerifiedCsr):
        assert choice.key_id == expected
    else:
        assert expected in choice


ROTATE_3 = replace(SETTINGS, key_rotation_renewals=3)
NEVER = replace(SETTINGS, key_rotation_renewals=0)
PENDING = KEY_A + ".20261101T000000Z"


@pytest.mark.parametrize("why, key_certs, current, settings, asks", [
    pytest.param(Cause.RENEWAL_DUE, 2, None, ROTATE_3, False, id="2nd certificate of a key: keep it"),
    pytest.param(Cause.RENEWAL_DUE, 3, None, ROTATE_3, False, id="3rd: keep it"),
    pytest.param(Cause.RENEWAL_DUE, 4, None, ROTATE_3, True, id="4th would exceed 3: renew and ask for a new key"),
    pytest.param(Cause.CA_CHANGED, 4, None, ROTATE_3, True, id="a CA re-issue counts too"),
    pytest.param(Cause.RENEWAL_DUE, 9, None, NEVER, False, id="0 disables rotation requests"),
    pytest.param(Cause.IDENTITY_CHANGED, 2, None, ROTATE_3, True, id="identity changed: ask for a new key"),
    pytest.param(Cause.IDENTITY_CHANGED, 2, None, NEVER, False, id="identity changed, requests disabled"),
    pytest.param(Cause.RENEWAL_DUE, 5, PENDING, ROTATE_3, False, id="a request already pending is kept"),
    pytest.param(Cause.RENEWAL_DUE, 4, "bbbbbbbbbbbbbbbb.20261001T000000Z", ROTATE_3, True,
                 id="an old token (for an earlier key) is not pending"),
])
def test_rekey_token(why, key_certs, current, settings, asks):
    now = T0 + timedelta(hours=13)
    token = rekey_token(why, key_certs, KEY_A, current, settings, now)
    if asks:
        assert token != current and token.startswith(KEY_A + ".") and REKEY_TOKEN.fullmatch(token)
        assert rekey_pending(token, KEY_A) and not rekey_pending(token, KEY_B)
    else:
        assert token == current


def test_delivered_from_status_round_trip_and_garbage():
    status = {"identity": SPIFFE, "instanceId": "42", "caFingerprint": "ca1", "keyId": KEY_A, "keyCerts": "3",
              "certSerial": "1F", "certNotBefore": "2026-11-01T00:00:00Z", "certNotAfter": "2026-11-02T00:00:00Z"}
    delivered = Delivered.from_status(Status.from_mapping(status))
    assert (delivered.not_after, delivered.key_id, delivered.key_certs, delivered.serial) == \
        (T0 + timedelta(hours=24), KEY_A, 3, "1f")
    assert Delivered.from_status(Status.from_mapping({**status, "certNotAfter": "tomorrow"})) is None
    assert Delivered.from_status(Status.from_mapping({**status, "keyId": "not hex"})) is None
    legacy = {k: v for k, v in status.items() if k not in ("keyId", "keyCerts")} | {"secret": "projects/1/x"}
    assert Delivered.from_status(Status.from_mapping(legacy)) is None  # meshjoin 2's statuses certify no VM-made key
    assert Delivered.from_status(Status.from_mapping({**status, "keyCerts": "many"})).key_certs == 1
    assert Delivered.from_status(Status()) is None


def test_read_csr_from_guest_attributes():
    from .vm_keys import csr_pem, ec_key

    key = ec_key()
    assert read_csr({}, "ecdsa-p256") is None
    assert read_csr({"csr": "  "}, "ecdsa-p256") is None
    assert read_csr({"csr": csr_pem(key)}, "ecdsa-p256").key_id == pki.key_id(key.public_key())
    assert isinstance(read_csr({"csr": "junk"}, "ecdsa-p256"), pki.CsrError)


@pytest.mark.parametrize("metadata, expected", [
    pytest.param({}, False, id="never touched"),
    pytest.param({"startup-script": "echo owner"}, False, id="owner's items only"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "denied"})}, False, id="denied before"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "left"})}, False, id="left before"),
    pytest.param({names.STATUS_KEY: json.dumps({"state": "joined"})}, True, id="joined"),
    pytest.param({names.SECRET_KEY: "projects/1/secrets/s/versions/1"}, True, id="legacy item left"),
    pytest.param({names.CERT_CHAIN_KEY: "-----BEGIN CERTIFICATE-----"}, True, id="certificate left"),
    pytest.param({names.STATUS_KEY: "not json"}, False, id="status overwritten by owner"),
])
def test_has_traces(metadata, expected):
    vm = Vm(VM.key, "42", {}, metadata, "fp", "10.0.0.2", "sa@x")
    assert has_traces(vm) is expected


@pytest.mark.parametrize("cause, sentence, first, same_key, verb", [
    (Cause.NO_CERT, "no certificate delivered yet", True, False, "delivered"),
    (Cause.RECREATED, "the VM was recreated or cloned (its instance id changed)", True, False, "delivered"),
    (Cause.IDENTITY_CHANGED, "the identity changed", True, True, "delivered"),
    (Cause.NEW_KEY, "the VM presents a new key", False, False, "rotated"),
    (Cause.FORCED, "an operator forced a new certificate", False, True, "renewed"),
    (Cause.CA_CHANGED, "the CA changed", False, True, "reissued"),
    (Cause.RENEWAL_DUE, "the certificate reached its renewal point", False, True, "renewed"),
])
def test_causes_keep_the_sentences_their_owners_read(cause, sentence, first, same_key, verb):
    """The reason text is unchanged from the sentence constants of 096ecd2; the sets and the verb map too."""
    assert (f"{cause}", str(cause), cause.first_delivery, cause.same_key, cause.verb) == \
        (sentence, sentence, first, same_key, verb)
