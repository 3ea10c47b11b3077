"""meshjoin's error vocabulary: each error says whether trying again can help.

Entry points act on the kind alone: a `TransientError` is raised out of the function so Pub/Sub
redelivers; a `PermanentError` is logged and the message acked (redelivery would loop forever).
"""

from __future__ import annotations


class MeshjoinError(Exception):
    """Base of meshjoin's own errors. Messages never carry key material."""


class PermanentError(MeshjoinError):
    """Trying again with the same input cannot succeed: log it, report it, ack."""


class TransientError(MeshjoinError):
    """A passing failure (429, 5xx, deadline, connection): retry with backoff, then redeliver."""


class SettingsError(PermanentError):
    """A setting is missing or invalid; the message names the environment variable."""


class BadMessage(PermanentError):
    """A Pub/Sub message that names no VM meshjoin should look at."""


class CaMaterialError(TransientError, ValueError):
    """The plug-in CA material in Secret Manager is unusable (mismatched key, broken chain).

    Transient on purpose: the four CA files are uploaded one version at a time, so a reconcile
    in the middle of an upload sees a new key beside the old cert. Retrying (redelivery, the next
    sweep) succeeds once the upload completes; a CA that stays broken ends in the dead-letter topic
    and in every sweep's error count, which is the operator's signal."""


class ApiPermissionError(PermanentError):
    """An API refused for lack of permission; the message names the permission to grant."""


class ConflictError(PermanentError):
    """An object meshjoin would write exists and belongs to someone else."""


# Signals one module raises for its caller to act on, not failures of an API call.


class CsrError(ValueError):
    """A CSR meshjoin refuses to certify. The message names the problem, never the CSR's bytes (the VM
    owner wrote them, and they may even hold a key pasted by mistake)."""


class Ignored(Exception):
    """A well-formed message that asks nothing of meshjoin (another method, a `first` entry, ...)."""


class StaleFingerprint(Exception):
    """setMetadata lost a race (412): re-read the VM and decide again."""


# What the adapters raise for an API's answer.


class KubeApiError(PermanentError):
    """The Kubernetes API refused a call in a way retrying cannot change; `status` is its HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class QuotaExceeded(TransientError):
    """429 / RESOURCE_EXHAUSTED / Compute's 403 rateLimitExceeded, with the server's Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
