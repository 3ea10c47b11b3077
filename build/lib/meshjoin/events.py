"""Decode a Pub/Sub push (as functions-framework hands it over) into the VM it names. Pure.

Two message kinds reach the events topic:
- a Cloud Audit Log `LogEntry` routed by the Log Router sink, for `v1.`/`beta.`
  `compute.instances.insert|delete|setLabels`;
- an operator's `{"project": ..., "zone": ..., "instance": ...}` from `gcloud pubsub topics publish`,
  the VM agent's nudge (the same three fields), or the sweep's per-VM work: the same three plus the
  optional hints `work` (join|renew|reissue|prune) and `sweep` (the sweep's id, a short token).

The result is only a `VmKey` (with `decode_work`, also the validated hints): an event is a hint, and
the reconcile reads the VM's truth itself, so duplicates and reordering cannot matter. The `work` and
`sweep` hints are NEVER trusted: VM accounts may publish to the events topic (the agent's nudge), so
anyone holding one can forge them. They are for logs and metrics; "prune" only lets the reconcile
remove meshjoin's registration of a VM that its own read shows gone (404) or unlabelled, which is
what the reconcile would do for that VM anyway once it sees traces of a join. Everything else raises `BadMessage` (malformed: a bug
or an attack upstream) or `Ignored` (well-formed, but nothing for meshjoin to do); both are acked.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .capacity import WORK_KINDS  # what a sweep publishes
from .errors import BadMessage, Ignored
from .model import VmKey

MAX_MESSAGE_BYTES = 64 * 1024  # audit entries are a few KiB; anything near Pub/Sub's 10 MB is not ours
# stop/start: a stopped (TERMINATED) VM must stop receiving traffic, and rejoin when started.
AUDIT_METHODS = frozenset({"compute.instances.insert", "compute.instances.delete", "compute.instances.setLabels",
                           "compute.instances.stop", "compute.instances.start"})
METHOD_PREFIXES = ("v1.", "beta.")
# Patterns are applied with fullmatch: `$` alone would also accept a trailing newline.
_RESOURCE = re.compile(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)")
_PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]{0,62}:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
# Zones are REGION-SUFFIX: the region is letters-letters+digit(s) (us-central1, me-central2,
# northamerica-northeast1), the suffix a letter (a, b, ...) or a longer form such as the AI zones'
# `ai1a` (us-central1-ai1a).
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z](?:[a-z0-9]{0,8}[a-z])?")
_INSTANCE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


_SWEEP_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Work:
    """The VM a message names, and the hints a sweep's message carries (None: absent)."""

    key: VmKey
    work: str | None = None
    sweep: str | None = None

    def log_fields(self) -> dict[str, str]:
        return {name: value for name, value in (("work", self.work), ("sweep", self.sweep)) if value is not None}


def decode_push(data: Any, *, now: datetime, max_age: timedelta) -> VmKey:
    """From the CloudEvent `data` of a Pub/Sub push to the VM it names."""
    return decode_work(data, now=now, max_age=max_age).key


def decode_work(data: Any, *, now: datetime, max_age: timedelta) -> Work:
    """From the CloudEvent `data` of a Pub/Sub push to the VM it names, with the sweep's hints."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        raise BadMessage("push body has no `message` object")
    message = data["message"]
    check_age(message.get("publishTime"), now=now, max_age=max_age)
    payload = decode_payload(message.get("data"))
    if isinstance(payload, dict) and "protoPayload" in payload:
        return Work(key_from_audit_entry(payload))
    if isinstance(payload, dict) and {"project", "zone", "instance"} <= payload.keys():
        return Work(key_from_operator_message(payload), *work_hints(payload))
    raise BadMessage("message is neither a Cloud Audit Log entry nor {project, zone, instance}")


def work_hints(message: dict) -> tuple[str | None, str | None]:
    """The optional `work` and `sweep` fields, validated (a value outside the enum or the token
    pattern is refused, never passed on to logs or decisions)."""
    work, sweep = message.get("work"), message.get("sweep")
    if work is not None and work not in WORK_KINDS:
        raise BadMessage(f"work must be one of {', '.join(WORK_KINDS)}: {str(work)[:40]!r}")
    if sweep is not None and not (isinstance(sweep, str) and _SWEEP_ID.fullmatch(sweep)):
        raise BadMessage(f"sweep must be a token of 1-64 letters, digits, '.', '_' or '-': {str(sweep)[:40]!r}")
    return work, sweep


def check_age(publish_time: Any, *, now: datetime, max_age: timedelta) -> None:
    """Pub/Sub stamps every message it delivers with publishTime (server-assigned, the publisher cannot
    set it). A push without one did not come from Pub/Sub as documented: refused rather than trusted as
    fresh, since an undated replay would otherwise skip the age check (the sweep covers any VM whose
    event this drops)."""
    if not isinstance(publish_time, str):
        raise BadMessage("message has no publishTime, so its age cannot be checked")
    try:
        published = datetime.fromisoformat(publish_time.replace("Z", "+00:00"))
    except ValueError:
        raise BadMessage(f"publishTime is not RFC 3339: {publish_time[:40]!r}") from None
    if published.tzinfo is None or published.utcoffset() is None:
        raise BadMessage(f"publishTime has no time zone: {publish_time[:40]!r}")
    if now - published > max_age:
        raise Ignored(f"event published {published.isoformat()} is older than {max_age}")


def decode_payload(raw: Any) -> Any:
    if not raw:
        raise BadMessage("message has no data")
    if not isinstance(raw, str):
        raise BadMessage("message data is not a base64 string")
    if len(raw) > MAX_MESSAGE_BYTES * 4 // 3 + 4:
        raise BadMessage(f"message data exceeds {MAX_MESSAGE_BYTES} bytes")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadMessage("message data is not valid base64") from None
    try:
        return json.loads(decoded)
    except (UnicodeDecodeError, ValueError):
        raise BadMessage(f"message data is not JSON ({len(decoded)} bytes)") from None
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack: hostile, not a bug of ours
        raise BadMessage(f"message data nests too deeply ({len(decoded)} bytes)") from None


def key_from_audit_entry(entry: dict) -> VmKey:
    proto = entry.get("protoPayload")
    if not isinstance(proto, dict):
        raise BadMessage("audit entry has no protoPayload object")
    if proto.get("serviceName") != "compute.googleapis.com":
        raise Ignored(f"audit entry for service {str(proto.get('serviceName'))[:80]!r}")
    method = proto.get("methodName")
    if not isinstance(method, str) or strip_version(method) not in AUDIT_METHODS:
        raise Ignored(f"audit entry for method {str(method)[:80]!r}")
    operation = entry.get("operation") or {}
    if not isinstance(operation, dict):
        raise BadMessage("audit entry operation is not an object")
    # A long operation logs twice. The VM is observable in its final state only once the
    # operation ends, so the `first` entry is a no-op and the `last` one triggers the reconcile.
    if operation.get("first") and not operation.get("last"):
        raise Ignored(f"first entry of {method}; acting on the last")
    resource_name = proto.get("resourceName")
    match = _RESOURCE.fullmatch(resource_name) if isinstance(resource_name, str) else None
    if not match:
        raise BadMessage(f"audit entry resourceName is not projects/P/zones/Z/instances/N: {str(resource_name)[:120]!r}")
    project, zone, instance = match.groups()
    resource = entry.get("resource")
    labels = resource.get("labels") if isinstance(resource, dict) else None
    if project.isdigit() and isinstance(labels, dict) and isinstance(labels.get("project_id"), str):
        project = labels["project_id"]  # some entries name the project by number
    return validated_key(project, zone, instance)


def strip_version(method: str) -> str:
    for prefix in METHOD_PREFIXES:
        if method.startswith(prefix):
            return method[len(prefix):]
    return method


def key_from_operator_message(message: dict) -> VmKey:
    values = [message.get(field) for field in ("project", "zone", "instance")]
    if not all(isinstance(v, str) for v in values):
        raise BadMessage("operator message fields project, zone, instance must be strings")
    return validated_key(*values)


def validated_key(project: str, zone: str, instance: str) -> VmKey:
    """Refuse names GCE could never have issued, so nothing odd flows into API paths or logs."""
    for what, value, pattern in (("project", project, _PROJECT), ("zone", zone, _ZONE),
                                 ("instance", instance, _INSTANCE)):
        if not pattern.fullmatch(value):
            raise BadMessage(f"{what} is not a valid GCE name: {value[:80]!r}")
    return VmKey(project, zone, instance)
