"""`meshjoin-status` as one typed value: the codec reads what meshjoin 096ecd2 wrote, writes the same bytes for
the same facts, and stays as tolerant of what the VM owner writes into the item."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from meshjoin.status import EMPTY, MAX_STATUS_BYTES, Delivered, State, Status, wire_fields, written

NOW = datetime(2026, 11, 30, 6, 5, 7, 123456, tzinfo=timezone.utc)


# The codec of 096ecd2 (bootstrap.status_value / bootstrap.parse_status), verbatim: the oracle.
def old_status_value(state: str, reason: str, now: datetime, **fields) -> str:
    status = {"state": state, "reason": reason, **{k: v for k, v in fields.items() if v is not None},
              "updated": now.replace(microsecond=0).isoformat().replace("+00:00", "Z")}
    return json.dumps(status, sort_keys=True, separators=(",", ":"))


def old_parse_status(raw: str | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(v, str) or (k == "warnings" and isinstance(v, list))}


JOINED_FIELDS = dict(identity="spiffe://cluster.local/ns/orders/sa/orders", workloadEntry="orders/orders-vm-1-1234",
                     instanceId="1234", address="10.0.0.7", caFingerprint="ab" * 32,
                     certNotBefore="2026-11-30T05:55:07Z", certNotAfter="2026-12-01T06:05:07Z", certSerial="1f2e",
                     keyId="0123456789abcdef", keyCerts="2", rekey=None, confirmedSerial="1f2e", waitingSince=None,
                     agent=None, warnings=None)
WAITING_FIELDS = dict(JOINED_FIELDS, workloadEntry=None, confirmedSerial=None, waitingSince="2026-11-30T06:00:00Z",
                      agent="agent 3 reports certificate none, sidecar unknown", rekey="0123456789abcdef.20261130T0600Z",
                      warnings=["the VM runs as the project's default compute service account", "ünïcode ☃"])


def _snake(values: dict) -> dict:
    names = [name for name in Status.__dataclass_fields__ if name != "extra"]
    by_wire = dict(zip(wire_fields(dict.fromkeys(names)), names))
    return {by_wire[k]: v for k, v in values.items()}


@pytest.mark.parametrize("state, reason, fields", [
    pytest.param(State.JOINED, "joined; the VM confirmed it", JOINED_FIELDS, id="joined"),
    pytest.param(State.WAITING, "waiting for the VM's key: \"quoted\" <b> & \\ \n", WAITING_FIELDS, id="waiting"),
    pytest.param(State.DENIED, "mesh-namespace 'x' is not bound", {}, id="denied, no fields"),
    pytest.param(State.LEFT, "removed by an operator", {}, id="left"),
    pytest.param(State.STOPPED, "the VM is TERMINATED: not routed", {"identity": "spiffe://x/ns/a/sa/b"}, id="stopped"),
    pytest.param(State.ERROR, "WorkloadEntry a/b exists and is not managed by meshjoin", {}, id="error"),
])
def test_the_new_encoding_is_the_old_one_byte_for_byte(state, reason, fields):
    old = old_status_value(str(state), reason, NOW, **fields)
    new = written(state, reason, NOW, **_snake(fields)).encode()
    assert new == old
    assert Status.decode(old) == Status.decode(new)
    assert Status.decode(old).wire() == old_parse_status(old)  # what the old code read, field for field


def test_a_status_the_old_code_wrote_decodes_to_its_facts():
    old = old_status_value("joined", "joined", NOW, **JOINED_FIELDS)
    status = Status.decode(old)
    assert status.state is State.JOINED and status.confirmed_serial == "1f2e" and status.key_certs == "2"
    assert status.updated == "2026-11-30T06:05:07Z" and status.workload_entry == "orders/orders-vm-1-1234"
    delivered = Delivered.from_status(status)
    assert delivered is not None and delivered.serial == "1f2e" and delivered.key_certs == 2
    assert written(State.JOINED, "joined", NOW, identity=status.identity, workload_entry=status.workload_entry,
                   instance_id=status.instance_id, address=status.address, confirmed_serial=status.confirmed_serial,
                   **delivered.recorded()).encode() == old


@pytest.mark.parametrize("raw", [
    None, "", "not json", "[1, 2]", '"joined"', "null", "{" * 100_000, '{"state": 1}',
    "{" + '"reason": "x",' * 10 + '"state": "joined"', json.dumps({"state": "x" * MAX_STATUS_BYTES}),
], ids=["absent", "empty", "garbage", "list", "string", "null", "deep", "int state", "truncated", "oversized"])
def test_what_cannot_be_a_status_is_an_empty_one(raw):
    assert Status.decode(raw) == EMPTY and not Status.decode(raw)


def test_non_string_fields_are_absent_and_unknown_words_are_kept():
    raw = json.dumps({"state": "bogus", "reason": ["a list"], "keyId": 7, "warnings": "not a list",
                      "secret": "projects/1/secrets/x", "owner": {"nested": 1}})
    status = Status.decode(raw)
    assert status.state == "bogus" and not isinstance(status.state, State)  # shown as written
    assert (status.reason, status.key_id, status.warnings) == (None, None, None)
    assert status.extra == (("secret", "projects/1/secrets/x"), ("warnings", "not a list"))
    assert status.wire() == {"secret": "projects/1/secrets/x", "state": "bogus", "warnings": "not a list"}
    assert bool(status)


def test_facts_leave_out_the_time_and_the_prose():
    a = written(State.WAITING, "one reason", NOW, identity="i")
    b = written(State.WAITING, "another", NOW.replace(hour=9), identity="i")
    assert a.facts == b.facts and a != b
    assert written(State.WAITING, "r", NOW, identity="j").facts != a.facts
    assert written(State.JOINED, "r", NOW, identity="i").facts != a.facts


TEXT = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(JOINED_FIELDS)), st.none() | TEXT),
       st.sampled_from(list(State)), TEXT, st.lists(TEXT, max_size=3))
def test_any_facts_encode_as_the_old_code_did(fields, state, reason, warnings):
    fields = dict(fields, warnings=warnings or None)
    assert written(state, reason, NOW, **_snake(fields)).encode() == old_status_value(str(state), reason, NOW,
                                                                                       **fields)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(JOINED_FIELDS) + ["state", "reason", "updated"]) | TEXT,
                       st.none() | TEXT | st.integers() | st.lists(TEXT | st.integers(), max_size=2), max_size=6))
def test_decode_reads_every_string_the_old_code_read(value):
    raw = json.dumps(value)
    decoded = Status.decode(raw).wire()
    old = old_parse_status(raw)
    assert decoded == old
