"""One retry policy for every Google API call: transient failures back off and retry, then surface
as `TransientError` (so Pub/Sub redelivers); everything else maps onto meshjoin's vocabulary."""

from __future__ import annotations

from typing import Callable, TypeVar

import tenacity
from google.api_core import exceptions as gexc

from ..errors import ApiPermissionError, MeshjoinError, PermanentError, TransientError

T = TypeVar("T")

_TRANSIENT_GOOGLE = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    gexc.DeadlineExceeded,
    gexc.RetryError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, *_TRANSIENT_GOOGLE)):
        return True
    # requests/urllib3 connection failures and timeouts (the REST transports, google-auth refresh).
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def translate(exc: BaseException, what: str, permission: str) -> MeshjoinError:
    """Map a client library error onto meshjoin's vocabulary; the message says what and why."""
    if is_transient(exc):
        return TransientError(f"{what}: {type(exc).__name__}: {_short(exc)}")
    if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
        return ApiPermissionError(f"{what}: permission denied ({_short(exc)}); meshjoin's service account "
                                  f"needs {permission}")
    return PermanentError(f"{what}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.splitlines()[0][:300] if text else ""


def call(fn: Callable[[], T], *, what: str, permission: str, attempts: int,
         passthrough: tuple[type[BaseException], ...] = ()) -> T:
    """Run `fn`, retrying transient failures with jittered exponential backoff.

    Exceptions in `passthrough` (e.g. NotFound where the caller decides) are re-raised untouched.
    """
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=3),
        reraise=True,
    )
    try:
        return retrying(fn)
    except passthrough:
        raise
    except MeshjoinError:
        raise
    except Exception as exc:
        raise translate(exc, what, permission) from exc
