"""Partial responses: the `fields` system parameter (or `$fields`, or the `X-Goog-FieldMask` header).

Google's API platform lets a caller name the fields it wants back ("System parameters",
cloud.google.com/apis/docs/system-parameters; Compute's "Improve performance" page,
cloud.google.com/compute/docs/api/how-tos/performance, "Partial response"). Its syntax:
- `a,b` selects several fields; `a/b` selects `b` inside `a`; `a(b,c)` selects `b` and `c` inside `a`;
- `*` selects every field at its level (and every key of a map, e.g. aggregatedList's `items/*/instances`);
- a field that is (or is inside) an array selects that part of every element;
- only what is selected comes back: a list's `nextPageToken` too, so a paged caller must name it
  (`fields=items(name),nextPageToken`), or it sees one page and stops;
- names are case-sensitive, and a name the resource does not have is refused: 400 "Invalid field
  selection NAME", reason `invalidParameter`, location `fields` (as Google answers it).

`SCHEMAS` name the fields of the resources the Compute emulator serves, so a mask naming something
else is refused as Google refuses it; below the levels a schema describes (None), names are not checked.
"""

from __future__ import annotations

import re
from typing import Any

from .web import ApiError



class _All:
    """The sub-mask of a field selected whole."""

    def __repr__(self) -> str:
        return "ALL"


# A parsed mask: field name -> sub-mask (a dict), or ALL.
ALL = _All()
_TOKEN = re.compile(r"\s*([A-Za-z_$][\w$.-]*|\*|[(),/])\s*")

# Field names per resource, nested: name -> schema of the value (a dict), or None (not described further).
# A map's values are described under "*"; an array's schema is its elements'.
_METADATA = {"kind": None, "fingerprint": None, "items": {"key": None, "value": None}}
INSTANCE = {name: None for name in (
    "advancedMachineFeatures", "canIpForward", "confidentialInstanceConfig", "cpuPlatform", "creationTimestamp",
    "deletionProtection", "description", "disks", "displayDevice", "fingerprint", "guestAccelerators", "hostname",
    "id", "instanceEncryptionKey", "keyRevocationActionType", "kind", "labelFingerprint", "labels",
    "lastStartTimestamp", "lastStopTimestamp", "lastSuspendedTimestamp", "machineType", "minCpuPlatform", "name",
    "networkPerformanceConfig", "params", "privateIpv6GoogleAccessType", "reservationAffinity", "resourcePolicies",
    "resourceStatus", "satisfiesPzi", "satisfiesPzs", "scheduling", "selfLink", "shieldedInstanceConfig",
    "shieldedInstanceIntegrityPolicy", "sourceMachineImage", "sourceMachineImageEncryptionKey", "startRestricted",
    "status", "statusMessage", "tags", "zone")}
INSTANCE.update({
    "metadata": _METADATA,
    "networkInterfaces": {name: None for name in (
        "accessConfigs", "aliasIpRanges", "fingerprint", "internalIpv6PrefixLength", "ipv6AccessConfigs",
        "ipv6AccessType", "ipv6Address", "kind", "name", "network", "networkAttachment", "networkIP", "nicType",
        "queueCount", "stackType", "subnetwork")},
    "serviceAccounts": {"email": None, "scopes": None},
})
_WARNING = {"code": None, "message": None, "data": {"key": None, "value": None}}
INSTANCE_LIST = {"kind": None, "id": None, "items": INSTANCE, "nextPageToken": None, "selfLink": None,
                 "warning": _WARNING}
INSTANCE_AGGREGATED_LIST = {"kind": None, "id": None, "nextPageToken": None, "selfLink": None, "warning": _WARNING,
                            "unreachables": None,
                            "items": {"*": {"instances": INSTANCE, "warning": _WARNING}}}
PROJECT = {name: None for name in (
    "cloudArmorTier", "creationTimestamp", "defaultNetworkTier", "defaultServiceAccount", "description",
    "enabledFeatures", "id", "kind", "name", "quotas", "selfLink", "usageExportLocation", "vmDnsSetting",
    "xpnProjectStatus")}
PROJECT["commonInstanceMetadata"] = _METADATA


def requested(request) -> str | None:
    """The caller's field mask: `fields` or `$fields` in the query, else the X-Goog-FieldMask header."""
    for name in ("fields", "$fields"):
        if request.args.get(name):
            return request.args[name]
    return request.headers.get("X-Goog-FieldMask") or None


def invalid(name: str) -> ApiError:
    err = ApiError(400, f"Invalid field selection {name}")
    err.error_reason = "invalidParameter"
    return err


def parse(text: str) -> dict:
    """`a/b(c,d),e` -> {"a": {"b": {"c": ALL, "d": ALL}}, "e": ALL}; a syntax error is a 400."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise invalid(text[pos:].split(",")[0].strip() or text)
        tokens.append(match.group(1))
        pos = match.end()
    tree, end = _parse_list(tokens, 0, text)
    if end != len(tokens):
        raise invalid(text)
    return tree


def _parse_list(tokens: list[str], pos: int, text: str) -> tuple[dict, int]:
    tree: dict = {}
    while True:
        path, pos = _parse_path(tokens, pos, text)
        _merge_into(tree, path)
        if pos < len(tokens) and tokens[pos] == ",":
            pos += 1
            continue
        return tree, pos


def _parse_path(tokens: list[str], pos: int, text: str) -> tuple[dict, int]:
    names = []
    while True:
        if pos >= len(tokens) or tokens[pos] in "(),/":
            raise invalid(text)
        names.append(tokens[pos])
        pos += 1
        if pos < len(tokens) and tokens[pos] == "/":
            pos += 1
            continue
        break
    leaf: dict | _All = ALL
    if pos < len(tokens) and tokens[pos] == "(":
        leaf, pos = _parse_list(tokens, pos + 1, text)
        if pos >= len(tokens) or tokens[pos] != ")":
            raise invalid(text)
        pos += 1
    for name in reversed(names):
        leaf = {name: leaf}
    return leaf, pos


def _merge_into(tree: dict, other: dict) -> None:
    """Union of two masks (in place): a field selected whole stays whole."""
    for name, sub in other.items():
        if name not in tree:
            tree[name] = sub
        elif tree[name] is ALL or sub is ALL:
            tree[name] = ALL
        else:
            merged = dict(tree[name])
            _merge_into(merged, sub)
            tree[name] = merged


def check(tree: dict | _All, schema: dict | None, path: str = "") -> None:
    """Refuse a name the resource does not have (as far as `schema` describes it)."""
    if schema is None or tree is ALL:
        return
    for name, sub in tree.items():
        where = f"{path}/{name}" if path else name
        if "*" in schema:  # a map: `*` or any key names its values
            check(sub, schema["*"], where)
            continue
        if name == "*":  # every field of a message: what lies below is not checked
            continue
        if name not in schema:
            raise invalid(where)
        check(sub, schema[name], where)


def apply(value: Any, tree: dict | _All) -> Any:
    """The selected part of `value` (a JSON value); arrays select within each element."""
    return compile_mask(tree)(value)


def _identity(value: Any) -> Any:
    return value


def compile_mask(tree: dict | _All):
    """`tree` as a function of a JSON value: a listing applies one mask to every VM of a page, so the
    mask is walked once, not once per VM."""
    if tree is ALL:
        return _identity
    wildcard = tree.get("*")
    named = []
    for name, sub in tree.items():
        if name == "*":
            continue
        if wildcard is not None and wildcard is not ALL and sub is not ALL:
            sub = dict(sub)
            _merge_into(sub, wildcard)
        named.append((name, compile_mask(ALL if wildcard is ALL else sub)))
    every = compile_mask(wildcard) if wildcard is not None else None
    names = {name for name, _ in named}

    def select_dict(value: dict) -> dict:
        out = {name: fn(value[name]) for name, fn in named if name in value}
        if every is not None:
            out.update((name, every(item)) for name, item in value.items() if name not in names)
        return out

    def select(value: Any) -> Any:
        if isinstance(value, list):
            return [select(element) for element in value]
        return select_dict(value) if isinstance(value, dict) else value

    return select


def select(request, body: Any, schema: dict) -> Any:
    """`body` as the caller asked for it (whole without a mask)."""
    text = requested(request)
    if text is None:
        return body
    tree = parse(text)
    check(tree, schema)
    return compile_mask(tree)(body)
