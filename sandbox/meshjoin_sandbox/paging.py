"""One paging scheme for the emulators: one token codec, one keyset page, and each API's dialect on top.

- Google: `pageToken` in, `nextPageToken` out; the page size is Compute's `maxResults`
  (`google_keyset_page`) or Secret Manager's `pageSize` (`google_offset_page`).
- Kubernetes: `limit` and `continue` in, `metadata.continue` and `remainingItemCount` out (`kube_page`).

Every token is URL-safe base64 (`encode_token`/`decode_token`) of either the JSON of the last key on
the page (Compute `["zone", "name"]`, Kubernetes `["namespace", "name"]`: the next page starts right
after it, so a write between pages neither repeats nor skips what is left) or Secret Manager's
`offset:N`. Clients treat them as opaque; the bytes are kept exactly as the emulators always wrote them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from typing import Callable, NamedTuple, Sequence

from werkzeug.wrappers import Request

from .web import ApiError

Key = tuple[str, str]


# --- the token codec ---------------------------------------------------------------------------------


def encode_token(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def decode_token(token: str) -> bytes:
    """Raises ValueError (binascii.Error) on a token that is not URL-safe base64."""
    return base64.urlsafe_b64decode(token.encode())


def encode_key(key: Key) -> str:
    return encode_token(json.dumps(list(key)).encode())


def decode_key(token: str) -> Key:
    """Raises ValueError or TypeError on a token that does not hold a two-part key."""
    first, second = json.loads(decode_token(token))
    return str(first), str(second)


# --- one keyset page ----------------------------------------------------------------------------------


class Page(NamedTuple):
    keys: list[Key]
    next_index: int | None  # in `order`, the first kept key past the page; None: this page is the last
    stop: int  # in `order`, the end of the listed scope

    @property
    def remaining(self) -> int:
        """Keys of the scope from the first one left off this page on (0 on the last page)."""
        return 0 if self.next_index is None else self.stop - self.next_index


def keyset_page(order: Sequence[Key], keep: Callable[[Key], bool], *, limit: int, scope: str | None = None,
                after: Key | None = None) -> Page:
    """The kept keys of `order` (sorted) that come after `after`, at most `limit` of them (0: all).

    `scope` limits the listing to the keys whose first part it is (a zone, a namespace): `(scope,)`
    sorts before every `(scope, name)` and `(scope + NUL,)` after them. The page starts by bisection
    and stops at the first kept key past the limit, so a whole listing reads each key once."""
    start, stop = 0, len(order)
    if scope is not None:
        start, stop = bisect.bisect_left(order, (scope,)), bisect.bisect_left(order, (scope + "\0",))
    if after is not None:
        start = max(start, bisect.bisect_right(order, after))
    keys: list[Key] = []
    for index in range(start, stop):
        key = order[index]
        if keep(key):
            if 0 < limit == len(keys):
                return Page(keys, index, stop)
            keys.append(key)
    return Page(keys, None, stop)


# --- Google: pageToken / maxResults (Compute) or pageSize (Secret Manager) ------------------------------


def google_keyset_page(request: Request, order: Sequence[Key], keep: Callable[[Key], bool], *,
                       max_results: int, scope: str | None = None) -> tuple[list[Key], str | None]:
    """Compute's paging: `maxResults` (0 or absent: `max_results`; above it: 400) and `pageToken`;
    answers the page's keys and its `nextPageToken` (None on the last page)."""
    args = request.args
    try:
        limit = int(args.get("maxResults", max_results)) or max_results
    except ValueError as exc:
        raise ApiError(400, f"Invalid value for field 'maxResults': '{args['maxResults']}'.") from exc
    if not 0 < limit <= max_results:
        raise ApiError(400, f"Invalid value for field 'maxResults': '{limit}'. "
                            f"Must be less than or equal to {max_results}")
    after = None
    if args.get("pageToken"):
        try:
            after = decode_key(args["pageToken"])
        except (ValueError, TypeError) as exc:
            raise ApiError(400, f"Invalid value for field 'pageToken': '{args['pageToken']}'.") from exc
    page = keyset_page(order, keep, limit=limit, scope=scope, after=after)
    return page.keys, encode_key(page.keys[-1]) if page.next_index is not None else None


def google_offset_page(items: list, request: Request, *, max_page: int) -> tuple[list, str]:
    """Secret Manager's paging over an already filtered, ordered list: `pageSize` (0 or absent:
    `max_page`; above it: `max_page`) and `pageToken`, an opaque offset; answers the chunk and its
    `nextPageToken` ("" on the last page)."""
    try:
        size = int(request.args.get("pageSize") or 0)
        token = request.args.get("pageToken") or ""
        start = int(decode_token(token).decode().removeprefix("offset:")) if token else 0
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(400, "Invalid page_size or page_token.", "INVALID_ARGUMENT") from exc
    if size < 0 or start < 0:
        raise ApiError(400, "page_size and page_token must not be negative.", "INVALID_ARGUMENT")
    end = start + min(size or max_page, max_page)
    return items[start:end], encode_token(f"offset:{end}".encode()) if end < len(items) else ""


def with_next_page_token(body: dict, token: str | None) -> dict:
    """`nextPageToken` is left out of the last page (proto3 JSON omits an empty string)."""
    if token:
        body["nextPageToken"] = token
    return body


# --- Kubernetes: limit / continue ----------------------------------------------------------------------


def kube_page(request: Request, order: Sequence[Key], keep: Callable[[Key], bool], *,
              scope: str | None = None) -> tuple[list[Key], str | None, int]:
    """The apiserver's chunked list: `limit` (0 or absent: all) and `continue`; answers the page's
    keys, its `metadata.continue` (None on the last page) and the count for `remainingItemCount`."""
    try:
        limit = int(request.args.get("limit") or 0)
    except ValueError as exc:
        raise ApiError(400, "limit must be an integer", "BadRequest") from exc
    token = request.args.get("continue")
    after = None
    if token:
        try:
            after = decode_key(token)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, "continue key is not valid: " + str(exc), "BadRequest") from exc
    page = keyset_page(order, keep, limit=limit, scope=scope, after=after)
    return page.keys, encode_key(page.keys[-1]) if page.next_index is not None else None, page.remaining
