"""An in-memory Kubernetes API for unit tests: the `Kube` port with the semantics meshjoin relies on.

What it keeps of the API server (and of `KubeAdapter`):
- objects by (kind, namespace, name), each with a `uid` (kept for the object's life) and a
  `resourceVersion` (new on every write); reads answer copies, as a server answers JSON;
- `apply_owned` replaces only what meshjoin owns (by the `existing` the caller read), with that read's
  resourceVersion: a write since answers 409 (`TransientError`), a delete since 404 (`PermanentError`: a
  PUT does not create WorkloadEntries, Services or ServiceAccounts, whose strategies refuse create on
  update; kubernetes/community#6041 shows the 404);
- `delete_owned` deletes only what meshjoin owns, with the uid as precondition (another object of the
  same name since: 409, nothing deleted; DeleteOptions.preconditions in the API reference);
- equality-based label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined), answered in pages of
  `page_size` (counted in `list_pages`), cluster-wide without a namespace.
"""

from __future__ import annotations

import copy
import re
from typing import Iterator

from .. import names
from ..errors import ConflictError, PermanentError, TransientError

_REQUIREMENT = re.compile(r"(!?)([A-Za-z0-9./_-]+)(?:(==|!=|=)([A-Za-z0-9._-]*))?")


def parse_selector(selector: str) -> list[tuple[str, str, str | None]]:
    """(operator, key, value) per requirement of an equality-based selector; set-based ones are refused."""
    requirements = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        match = _REQUIREMENT.fullmatch(part)
        if match is None or (match.group(1) and match.group(3)):
            raise ValueError(f"FakeKube does not understand the selector requirement {part!r}")
        negated, key, op, value = match.groups()
        requirements.append(("!" if negated else "exists", key, None) if op is None else
                            ("!=" if op == "!=" else "=", key, value))
    return requirements


def selects(requirements: list[tuple[str, str, str | None]], labels: dict) -> bool:
    for op, key, value in requirements:
        if op == "exists" and key not in labels or op == "!" and key in labels or \
                op == "=" and labels.get(key) != value or op == "!=" and labels.get(key) == value:
            return False
    return True


class FakeKube:
    """Objects by (kind, namespace, name); see the module docstring for the semantics kept."""

    def __init__(self, objects: list[dict] = ()):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.uid = 0  # the last uid / resourceVersion handed out
        self.list_pages = 0
        for obj in objects:
            self._store(obj)

    def _store(self, obj: dict, uid: str | None = None) -> dict:
        self.uid += 1
        obj = copy.deepcopy(obj)
        obj["metadata"].update(uid=uid or f"uid-{self.uid}", resourceVersion=str(self.uid))
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    # --- the Kube port ------------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        obj = self.objects.get((kind, namespace, name))
        return None if obj is None else copy.deepcopy(obj)

    def list(self, kind: str, label_selector: str, namespace: str | None = None,
             page_size: int = 500) -> Iterator[dict]:
        requirements = parse_selector(label_selector)
        found = [o for (k, ns, _), o in sorted(self.objects.items()) if k == kind and namespace in (None, ns)
                 and selects(requirements, o["metadata"].get("labels") or {})]
        for start in range(0, max(len(found), 1), page_size):
            self.list_pages += 1
            for obj in found[start:start + page_size]:
                yield copy.deepcopy(obj)

    def create_if_missing(self, obj: dict) -> dict:
        return self.get(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]) or self._store(obj)

    def apply_owned(self, obj: dict, existing: dict | None) -> dict:
        kind, meta = obj["kind"], obj["metadata"]
        where = f"{kind} {meta['namespace']}/{meta['name']}"
        current = self.objects.get((kind, meta["namespace"], meta["name"]))
        if existing is None:
            if current is None:
                return self._store(obj)
            existing = copy.deepcopy(current)  # 409 on create: read it and replace it like any other
        if not names.owned(existing.get("metadata")):
            raise ConflictError(f"{where} exists and is not managed by meshjoin; remove it or rename the VM")
        if current is None:  # a PUT of what was deleted since it was read
            raise PermanentError(f"kubernetes PUT {where}: 404 not found (does the namespace exist?)")
        if current["metadata"].get("resourceVersion") != existing["metadata"].get("resourceVersion"):
            raise TransientError(f"{where} changed concurrently")
        return self._store(obj, uid=current["metadata"].get("uid"))

    def delete_owned(self, kind: str, namespace: str, name: str, expected: dict | None = None) -> bool:
        obj = expected if expected is not None else self.get(kind, namespace, name)
        if obj is None or not names.owned(obj.get("metadata")):
            return False
        current = self.objects.get((kind, namespace, name))
        if current is None or current["metadata"].get("uid") != obj["metadata"].get("uid"):
            return False  # 404, or 409 on the uid precondition: another object of that name now
        del self.objects[(kind, namespace, name)]
        return True
