"""One retry policy for every Google API call: transient failures back off and retry, then surface
as `TransientError` (so Pub/Sub redelivers); everything else maps onto meshjoin's vocabulary."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import tenacity
from google.api_core import exceptions as gexc

from ..errors import ApiPermissionError, MeshjoinError, PermanentError, QuotaExceeded, TransientError

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


# Over a per-minute quota, retrying within the same minute only spends more of it: quota errors
# back off (Retry-After when the server names it, else exponentially from QUOTA_FIRST_WAIT) until
# QUOTA_RETRY_WINDOW has passed, which outlasts the quota's one-minute window.
QUOTA_FIRST_WAIT = 4.0
QUOTA_MAX_WAIT = 32.0
QUOTA_RETRY_WINDOW = 90.0


def is_quota_error(exc: BaseException) -> bool:
    if isinstance(exc, (QuotaExceeded, gexc.TooManyRequests, gexc.ResourceExhausted)):
        return True
    # Compute answers its rate quotas with 403 and reason rateLimitExceeded / userRateLimitExceeded.
    if isinstance(exc, gexc.Forbidden):
        reasons = " ".join(str(e.get("reason", "")) for e in (getattr(exc, "errors", None) or [])
                           if isinstance(e, dict))
        return "RateLimitExceeded" in reasons or "rateLimitExceeded" in f"{reasons} {exc}"
    return False


def retry_after(exc: BaseException) -> float | None:
    """Seconds named by the answer's Retry-After header (delta-seconds form), if any."""
    if isinstance(exc, QuotaExceeded):
        return exc.retry_after
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return value if 0 <= value <= 3600 else None


def quota_wait(attempt: int, exc: BaseException) -> float:
    """How long to wait before retry number `attempt` (1-based) after a quota error."""
    named = retry_after(exc)
    if named is not None:
        return max(named, 1.0)
    return min(QUOTA_MAX_WAIT, QUOTA_FIRST_WAIT * 2 ** (attempt - 1))


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, *_TRANSIENT_GOOGLE)) or is_quota_error(exc):
        return True
    # requests/urllib3 connection failures and timeouts (the REST transports, google-auth refresh).
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def translate(exc: BaseException, what: str, permission: str) -> MeshjoinError:
    """Map a client library error onto meshjoin's vocabulary; the message says what and why."""
    if is_quota_error(exc):
        return QuotaExceeded(f"{what}: over the API's rate quota ({_short(exc)}); still refused after "
                             f"backing off {QUOTA_RETRY_WINDOW:.0f}s", retry_after(exc))
    if is_transient(exc):
        return TransientError(f"{what}: {type(exc).__name__}: {_short(exc)}")
    if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
        return ApiPermissionError(f"{what}: permission denied ({_short(exc)}); meshjoin's service account "
                                  f"needs {permission}")
    return PermanentError(f"{what}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.splitlines()[0][:300] if text else ""


def _stop(attempts: int, quota_window: float):
    """Stop after `attempts` tries, except that quota errors keep retrying until the backoff waited
    `quota_window` in all."""
    def stop(state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None and is_quota_error(exc):
            return state.idle_for >= quota_window
        return state.attempt_number >= attempts
    return stop


def _wait(state: tenacity.RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if exc is not None and is_quota_error(exc):
        return quota_wait(state.attempt_number, exc)
    return _ORDINARY_WAIT(state)


_ORDINARY_WAIT = tenacity.wait_random_exponential(multiplier=0.2, max=3)


def call(fn: Callable[[], T], *, what: str, permission: str, attempts: int,
         passthrough: tuple[type[BaseException], ...] = (), pace: Callable[[], object] | None = None,
         quota_window: float = QUOTA_RETRY_WINDOW, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying transient failures with jittered exponential backoff.

    Exceptions in `passthrough` (e.g. NotFound where the caller decides) are re-raised untouched.
    `pace` runs before every attempt (the process's rate limiter: a retry costs quota too).
    """
    def attempt() -> T:
        if pace is not None:
            pace()
        return fn()

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=_stop(attempts, quota_window),
        wait=_wait,
        sleep=sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except passthrough:
        raise
    except MeshjoinError:
        raise
    except Exception as exc:
        raise translate(exc, what, permission) from exc
