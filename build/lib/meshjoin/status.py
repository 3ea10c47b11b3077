"""`meshjoin-status`, the instance metadata item meshjoin writes on every VM it handles: one typed value
and its codec. Pure.

The VM owner reads it (`gcloud compute instances describe`), and can write it too: the decode keeps
only the shapes meshjoin writes (a field that is not a string is absent; bad JSON, or an item larger
than MAX_STATUS_BYTES, is an empty status). The encoding is compact JSON with sorted keys, `updated` in
RFC 3339 with a Z, absent fields left out: it is listed with every VM (a 4 kB budget of meshjoin items a
VM), and a status written by an earlier meshjoin decodes as it wrote it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Mapping

from . import names
from .model import Vm


class State(StrEnum):
    """What a VM's status says about it (its owner may have written another word: kept verbatim)."""

    WAITING = "waiting"  # meshjoin did its part; the VM's agent has to hand in its key or confirm
    JOINED = "joined"
    LEFT = "left"
    DENIED = "denied"
    STOPPED = "stopped"
    ERROR = "error"


# Far above what meshjoin writes (tests/unit/test_metadata_budget.py keeps all its items of a VM within 4 kB)
# and below GCE's 256 KB a value: a larger item is the owner's, and is not parsed at all.
MAX_STATUS_BYTES = 32 * 1024
KEY_ID = re.compile(r"[0-9a-f]{16}")


def rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"{value[:40]!r} has no time zone")
    return parsed


def time_or_none(value: str | None) -> datetime | None:
    """A status's time field, or None when absent or not a time with a zone."""
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def normalize_serial(value: str) -> str | None:
    """A reported serial as meshjoin writes it: hex, lowercase, no leading zeros (openssl prints upper case,
    maybe with colons)."""
    text = value.strip().lower().replace(":", "")
    if text.startswith("serial="):
        text = text[len("serial="):]
    if not text or len(text) > 64 or any(c not in "0123456789abcdef" for c in text):
        return None
    return text.lstrip("0") or "0"


@dataclass(frozen=True, slots=True)
class Status:
    """The decoded `meshjoin-status`. Field names are the item's JSON keys in snake case (`wire_name`)."""

    state: State | str | None = None  # a word meshjoin does not write stays as the owner wrote it
    reason: str | None = None
    updated: str | None = None  # RFC 3339, Z
    identity: str | None = None  # the SPIFFE id granted
    workload_entry: str | None = None  # namespace/name
    instance_id: str | None = None
    address: str | None = None
    ca_fingerprint: str | None = None
    cert_not_before: str | None = None
    cert_not_after: str | None = None
    cert_serial: str | None = None
    key_id: str | None = None
    key_certs: str | None = None  # a decimal count, as text
    rekey: str | None = None
    confirmed_serial: str | None = None
    waiting_since: str | None = None
    agent: str | None = None
    warnings: tuple[str, ...] | None = None
    # String fields of a status meshjoin does not write (an earlier meshjoin's `secret`, the owner's own):
    # kept so that the status is rewritten, as before, rather than left with them.
    extra: tuple[tuple[str, str], ...] = ()

    # --- codec ----------------------------------------------------------------------------------

    @classmethod
    def decode(cls, raw: str | None) -> "Status":
        """The item's value (None: no such item) as a Status; whatever cannot be meshjoin's is left out."""
        if not raw or len(raw) > MAX_STATUS_BYTES:
            return EMPTY
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return EMPTY  # the owner may have overwritten it; treat as absent
        return cls.from_mapping(value) if isinstance(value, dict) else EMPTY

    @classmethod
    def of(cls, vm: Vm) -> "Status":
        """The VM's `meshjoin-status` item, decoded."""
        return cls.decode(vm.metadata.get(names.STATUS_KEY))

    @classmethod
    def from_mapping(cls, value: Mapping) -> "Status":
        known: dict = {}
        extra = []
        for key, item in value.items():
            name = _FIELD_BY_WIRE.get(key)
            if name == "warnings" and isinstance(item, list):
                known[name] = tuple(item)  # meshjoin writes strings; compared, never read, so kept as written
            elif not isinstance(item, str):
                continue  # the VM owner can write this item: only strings are meshjoin's shapes
            elif name is None or name == "warnings":  # a string `warnings` is not meshjoin's: kept as written
                extra.append((key, item))
            elif name == "state":
                known[name] = _state(item)
            else:
                known[name] = item
        return cls(**known, extra=tuple(sorted(extra)))

    def wire(self) -> dict:
        """The item as a JSON object: the fields that are set, by their JSON keys."""
        out: dict = dict(self.extra)
        for name, key in _WIRE_BY_FIELD.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = list(value) if name == "warnings" else str(value)
        return dict(sorted(out.items()))

    def encode(self) -> str:
        return json.dumps(self.wire(), sort_keys=True, separators=(",", ":"))  # compact: listed with every VM

    # --- reading --------------------------------------------------------------------------------

    def __bool__(self) -> bool:
        return self != EMPTY

    @property
    def facts(self) -> dict:
        """What the status says, but when it was written and the prose: equal facts need no rewrite."""
        return {k: v for k, v in self.wire().items() if k not in ("updated", "reason")}

    def names_vm(self, instance_id: str, spiffe: str) -> bool:
        """Whether the status was written for this VM incarnation and identity (not copied from another)."""
        return self.instance_id == instance_id and self.identity == spiffe


def _state(value: str) -> State | str:
    try:
        return State(value)
    except ValueError:
        return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_WIRE_BY_FIELD = {f.name: _camel(f.name) for f in fields(Status) if f.name != "extra"}
_FIELD_BY_WIRE = {wire: name for name, wire in _WIRE_BY_FIELD.items()}
EMPTY = Status()


def written(state: State, reason: str, now: datetime, **values) -> Status:
    """The status meshjoin writes now; `values` by field name (None: left out)."""
    warnings = values.pop("warnings", None)
    return Status(state=state, reason=reason, updated=rfc3339(now.replace(microsecond=0)),
                  warnings=tuple(warnings) if warnings else None, **values)


@dataclass(frozen=True)
class Delivered:
    """The certificate the VM was last given, as recorded in its `meshjoin-status`."""

    spiffe: str
    instance_id: str
    ca_fingerprint: str
    key_id: str  # pki.key_id of the certified public key
    not_before: datetime
    not_after: datetime
    serial: str = ""  # hex, lowercase, no leading zeros (what the agent reports as cert-serial)
    key_certs: int = 1  # certificates issued for this key so far

    @classmethod
    def from_status(cls, status: Status) -> "Delivered | None":
        """None unless every piece is there and well-formed: the VM owner can write this item too."""
        pieces = (status.identity, status.instance_id, status.ca_fingerprint, status.key_id)
        if any(piece is None for piece in pieces) or not KEY_ID.fullmatch(status.key_id):
            return None
        not_before, not_after = time_or_none(status.cert_not_before), time_or_none(status.cert_not_after)
        if not_before is None or not_after is None:
            return None
        certs = status.key_certs or "1"
        key_certs = int(certs) if certs.isdigit() and 0 < len(certs) <= 6 else 1
        return cls(*pieces, not_before=not_before, not_after=not_after,
                   serial=normalize_serial(status.cert_serial or "") or "", key_certs=max(1, key_certs))

    def recorded(self) -> dict:
        """The status fields that record this certificate."""
        return dict(ca_fingerprint=self.ca_fingerprint, cert_not_before=rfc3339(self.not_before),
                    cert_not_after=rfc3339(self.not_after), cert_serial=self.serial or None, key_id=self.key_id,
                    key_certs=str(self.key_certs))


def wire_fields(values: Mapping) -> dict:
    """Status field values by their JSON keys (None kept: what a reconcile's Outcome reports)."""
    return {_WIRE_BY_FIELD[name]: value for name, value in values.items()}
