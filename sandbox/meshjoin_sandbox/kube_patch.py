"""JSON merge patch (RFC 7386), strategic merge patch as the sandbox applies it, and JSON patch (RFC 6902).
"""

from __future__ import annotations

import copy
from typing import Any

from .kube_schema import json_type
from .web import ApiError


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strip_directives(patch: Any) -> Any:
    """A strategic merge patch without its `$patch`/`$setElementOrder/...` directive keys."""
    if isinstance(patch, dict):
        return {k: strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strip_directives(v) for v in patch]
    return patch


class PatchFailed(Exception):
    """A JSON patch operation that does not apply to the object (422, as the apiserver answers)."""


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchFailed(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]


def _index(token: str, size: int) -> int:
    if not token.isdigit() or int(token) >= size:
        raise PatchFailed(f"array index {token!r} out of range")
    return int(token)


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(token, len(doc))]
        else:
            raise PatchFailed(f"path /{'/'.join(tokens)} does not exist")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else _index(last, len(parent) + 1), value)
    else:
        raise PatchFailed(f"cannot add below a {json_type(parent)}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchFailed("cannot remove the whole object")
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(last, len(parent)))
    raise PatchFailed(f"path /{'/'.join(tokens)} does not exist")


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
        raise ApiError(400, "a JSON patch must be a list of operations", "BadRequest")
    doc = copy.deepcopy(doc)
    for op in operations:
        name, path = op.get("op"), _pointer(op.get("path"))
        if name in ("add", "replace", "test") and "value" not in op:
            raise ApiError(400, f"JSON patch operation {name!r} needs a value", "BadRequest")
        if name == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif name == "remove":
            _remove(doc, path)
        elif name == "replace":
            _resolve(doc, path)
            if path:
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif name in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = copy.deepcopy(_resolve(doc, source))
            if name == "move":
                _remove(doc, source)
            doc = _add(doc, path, value)
        elif name == "test":
            if _resolve(doc, path) != op["value"]:
                raise PatchFailed(f"testing value {op.get('path')} failed")
        else:
            raise ApiError(400, f"unknown JSON patch operation {name!r}", "BadRequest")
    return doc
