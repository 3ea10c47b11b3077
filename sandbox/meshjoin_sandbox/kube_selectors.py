"""Label and field selectors as the API server parses them (equality- and set-based).
"""

from __future__ import annotations

import re

from .web import ApiError


_SELECTOR_SPLIT = re.compile(r",(?![^()]*\))")  # commas outside `in (...)` lists
_SELECTOR_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_EXISTS_RE = re.compile(rf"(!?)\s*({_SELECTOR_KEY})")
_EQUALITY_RE = re.compile(rf"({_SELECTOR_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)")
_SET_RE = re.compile(rf"({_SELECTOR_KEY})\s+(in|notin)\s*\(([^()]*)\)")


def parse_selector(text: str, set_based: bool = True) -> list[tuple[str, str, frozenset[str]]]:
    """Parse a label selector (or, with set_based=False, a field selector) into (op, key, values)."""
    requirements = []
    for part in filter(None, (p.strip() for p in _SELECTOR_SPLIT.split(text or ""))):
        if match := _EQUALITY_RE.fullmatch(part):
            key, op, value = match.groups()
            requirements.append(("!=" if op == "!=" else "=", key, frozenset([value])))
        elif set_based and (match := _SET_RE.fullmatch(part)):
            key, op, values = match.groups()
            requirements.append((op, key, frozenset(v.strip() for v in values.split(",") if v.strip())))
        elif set_based and (match := _EXISTS_RE.fullmatch(part)):
            bang, key = match.groups()
            requirements.append(("!" if bang else "exists", key, frozenset()))
        else:
            raise ApiError(400, f"unable to parse requirement: {part!r}", "BadRequest")
    return requirements


def selector_matches(requirements: list[tuple[str, str, frozenset[str]]], values: dict[str, str]) -> bool:
    for op, key, wanted in requirements:
        present = key in values
        if op == "exists":
            ok = present
        elif op == "!":
            ok = not present
        elif op in ("=", "in"):
            ok = present and values[key] in wanted
        else:  # "!=" and "notin" also match objects without the key
            ok = not present or values[key] not in wanted
        if not ok:
            return False
    return True


FIELD_SELECTABLE = ("metadata.name", "metadata.namespace")
