"""Event decoding: table of push bodies (shapes of real audit entries and operator messages) → VM key or a clear refusal."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from meshjoin.errors import BadMessage
from meshjoin.events import MAX_MESSAGE_BYTES, Ignored, decode_push
from meshjoin.model import VmKey

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
MAX_AGE = timedelta(hours=1)
KEY = VmKey("my-project", "us-central1-a", "vm-1")


def audit_entry(method="v1.compute.instances.insert", *, first=False, last=True,
                resource="projects/my-project/zones/us-central1-a/instances/vm-1",
                service="compute.googleapis.com", project_label="my-project") -> dict:
    """A Cloud Audit Log LogEntry as the Log Router sink publishes it (see DESIGN.md)."""
    operation = {"id": "operation-1700000000000-abc", "producer": "compute.googleapis.com"}
    if first:
        operation["first"] = True
    if last:
        operation["last"] = True
    return {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": service,
            "methodName": method,
            "resourceName": resource,
            "authenticationInfo": {"principalEmail": "owner@example.com"},
            "request": {"@type": "type.googleapis.com/compute.instances.insert"},
        },
        "insertId": "abc123",
        "resource": {"type": "gce_instance",
                     "labels": {"instance_id": "4242", "project_id": project_label, "zone": "us-central1-a"}},
        "timestamp": "2026-11-21T11:59:58Z",
        "severity": "NOTICE",
        "logName": "projects/my-project/logs/cloudaudit.googleapis.com%2Factivity",
        "operation": operation,
    }


def push(payload, *, raw: bytes | None = None, publish_time="2026-11-21T11:59:59.123Z") -> dict:
    data = raw if raw is not None else json.dumps(payload).encode()
    message = {"data": base64.b64encode(data).decode(), "attributes": {}, "messageId": "1"}
    if publish_time:
        message["publishTime"] = publish_time
    return {"message": message}


def decode(body):
    return decode_push(body, now=NOW, max_age=MAX_AGE)


@pytest.mark.parametrize("body", [
    pytest.param(push(audit_entry("v1.compute.instances.insert")), id="v1-insert-last"),
    pytest.param(push(audit_entry("beta.compute.instances.insert")), id="beta-insert-last (Console)"),
    pytest.param(push(audit_entry("v1.compute.instances.delete")), id="v1-delete-last"),
    pytest.param(push(audit_entry("beta.compute.instances.delete")), id="beta-delete-last"),
    pytest.param(push(audit_entry("v1.compute.instances.setLabels")), id="v1-setLabels-last"),
    pytest.param(push(audit_entry("v1.compute.instances.stop")), id="v1-stop-last: a stopped VM leaves routing"),
    pytest.param(push(audit_entry("beta.compute.instances.start")), id="beta-start-last: a started VM rejoins"),
    pytest.param(push(audit_entry("v1.compute.instances.setLabels", first=True, last=True)),
                 id="single entry both first and last"),
    pytest.param(push(audit_entry("v1.compute.instances.insert", first=False, last=False)),
                 id="entry without operation markers"),
    pytest.param(push(audit_entry(resource="projects/123456/zones/us-central1-a/instances/vm-1")),
                 id="project by number, id from resource labels"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1"}),
                 id="operator message"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1", "note": "x"}),
                 id="operator message with extra field"),
])
def test_decodes_to_vm_key(body):
    assert decode(body) == KEY


@pytest.mark.parametrize("body, words", [
    pytest.param(push(audit_entry("v1.compute.instances.insert", first=True, last=False)),
                 "first entry", id="first entry waits for last"),
    pytest.param(push(audit_entry("v1.compute.instances.reset")), "compute.instances.reset", id="other method"),
    pytest.param(push(audit_entry("v1.compute.disks.insert")), "disks.insert", id="other resource"),
    pytest.param(push(audit_entry(service="storage.googleapis.com")), "storage.googleapis.com",
                 id="other service"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1"},
                      publish_time="2026-11-21T10:00:00Z"), "older than", id="stale event"),
])
def test_ignored(body, words):
    with pytest.raises(Ignored, match=words):
        decode(body)


@pytest.mark.parametrize("body, words", [
    pytest.param({}, "no `message`", id="empty envelope"),
    pytest.param([], "no `message`", id="envelope is a list"),
    pytest.param({"message": "x"}, "no `message`", id="message not an object"),
    pytest.param({"message": {"data": "", "publishTime": "2026-11-21T11:59:59Z"}}, "no data", id="empty data"),
    pytest.param({"message": {"publishTime": "2026-11-21T11:59:59Z"}}, "no data", id="missing data"),
    pytest.param({"message": {"data": 12, "publishTime": "2026-11-21T11:59:59Z"}}, "base64 string", id="data not a string"),
    pytest.param({"message": {"data": "!!notbase64!!", "publishTime": "2026-11-21T11:59:59Z"}}, "not valid base64", id="garbage base64"),
    pytest.param(push(None, raw=b"\xff\xfe garbage"), "not JSON", id="binary garbage"),
    pytest.param(push(None, raw=b"hello"), "not JSON", id="plain text"),
    pytest.param(push(None, raw=b"{}"), "neither", id="empty json object"),
    pytest.param(push([1, 2]), "neither", id="json list"),
    pytest.param(push("just a string"), "neither", id="json string"),
    pytest.param(push(None, raw=b"x" * (MAX_MESSAGE_BYTES + 10)), "exceeds", id="huge payload"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": 7}), "must be strings",
                 id="operator instance not a string"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "VM_1"}), "instance",
                 id="operator instance invalid"),
    pytest.param(push({"project": "my-project", "zone": "../etc", "instance": "vm-1"}), "zone",
                 id="operator zone path traversal"),
    pytest.param(push({"project": "x", "zone": "us-central1-a", "instance": "vm-1"}), "project",
                 id="operator project too short"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1\nX"}), "instance",
                 id="newline in instance"),
    pytest.param(push(audit_entry(resource="projects/p/global/networks/n")), "resourceName", id="bad resource"),
    pytest.param(push({"protoPayload": "x"}), "protoPayload", id="protoPayload not object"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1"},
                      publish_time="yesterday"), "RFC 3339", id="bad publishTime"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1"}, publish_time=None),
                 "no publishTime", id="no publishTime: refused, an undated replay never skips the age check"),
    pytest.param(push(audit_entry(resource="projects/my-project/zones/us-central1-a/instances/vm-1\n")),
                 "instance", id="trailing newline in resourceName (fullmatch)"),
    pytest.param(push({"project": "my-project", "zone": "us-central1-a", "instance": "vm-1\n"}), "instance",
                 id="trailing newline in instance (fullmatch)"),
])
def test_rejected(body, words):
    with pytest.raises(BadMessage, match=words):
        decode(body)


# Defect 6: real zones the old pattern refused (AI zones, two-part regions with a digit-led suffix),
# and fullmatch: `$` alone let a trailing newline through.
@pytest.mark.parametrize("zone", ["us-central1-a", "us-central1-ai1a", "europe-west4-a", "me-central2-b",
                                  "northamerica-northeast1-c", "asia-southeast1-b", "africa-south1-a",
                                  "us-south1-ai1b"])
def test_defect6_every_real_zone_form_is_accepted(zone):
    for body in (push({"project": "my-project", "zone": zone, "instance": "vm-1"}),
                 push(audit_entry(resource=f"projects/my-project/zones/{zone}/instances/vm-1"))):
        assert decode(body) == VmKey("my-project", zone, "vm-1")


@pytest.mark.parametrize("zone", ["us-central1-a\n", "us-central1", "us-central1-", "US-central1-a",
                                  "us-central1-a/x", "global", "us-central1-1a"])
def test_defect6_zone_lookalikes_are_refused(zone):
    with pytest.raises(BadMessage, match="zone"):
        decode(push({"project": "my-project", "zone": zone, "instance": "vm-1"}))


def test_defect6_trailing_newline_in_any_name_is_refused():
    for message in ({"project": "my-project\n", "zone": "us-central1-a", "instance": "vm-1"},
                    {"project": "my-project", "zone": "us-central1-a", "instance": "vm-1\n"}):
        with pytest.raises(BadMessage):
            decode(push(message))


# --- the sweep's per-VM work (issue 16): hints validated, returned beside the key, never needed -------

OPERATOR = {"project": "my-project", "zone": "us-central1-a", "instance": "vm-1"}


@pytest.mark.parametrize("hints, work, sweep", [
    ({}, None, None),
    ({"work": "renew", "sweep": "20261121T120000Z-a1b2c3"}, "renew", "20261121T120000Z-a1b2c3"),
    ({"work": "join"}, "join", None),
    ({"work": "reissue", "sweep": "s"}, "reissue", "s"),
    ({"work": "prune", "sweep": "x" * 64}, "prune", "x" * 64),
    ({"unknown-extra": "ignored as before"}, None, None),
])
def test_work_hints_are_decoded_beside_the_key(hints, work, sweep):
    from meshjoin.events import decode_work

    decoded = decode_work(push({**OPERATOR, **hints}), now=NOW, max_age=MAX_AGE)
    assert (decoded.key, decoded.work, decoded.sweep) == (KEY, work, sweep)
    assert decode(push({**OPERATOR, **hints})) == KEY  # decode_push: the key alone, as before
    assert decoded.log_fields() == {k: v for k, v in (("work", work), ("sweep", sweep)) if v is not None}


@pytest.mark.parametrize("hints, words", [
    ({"work": "delete"}, "work must be one of"),
    ({"work": "PRUNE"}, "work must be one of"),
    ({"work": ["prune"]}, "work must be one of"),
    ({"work": ""}, "work must be one of"),
    ({"sweep": "x" * 65}, "sweep must be a token"),
    ({"sweep": "a b"}, "sweep must be a token"),
    ({"sweep": "s\n"}, "sweep must be a token"),
    ({"sweep": 7}, "sweep must be a token"),
    ({"sweep": ""}, "sweep must be a token"),
])
def test_bad_work_hints_are_refused_with_a_clear_reason(hints, words):
    with pytest.raises(BadMessage, match=words):
        decode(push({**OPERATOR, **hints}))


def test_an_audit_entry_carries_no_hints():
    from meshjoin.events import decode_work

    decoded = decode_work(push(audit_entry()), now=NOW, max_age=MAX_AGE)
    assert decoded.work is None and decoded.sweep is None
