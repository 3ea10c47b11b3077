"""What the two Cloud Functions do with a CloudEvent; `functions/*/main.py` only forward here.

Contract with Pub/Sub: return → ack; raise → HTTP 500 → redelivery (with backoff, then the
dead-letter topic). Only transient failures raise; a bad message or a permanent failure is logged
and acked, so nothing loops.
"""

from __future__ import annotations

from .errors import BadMessage, Ignored, SettingsError, TransientError
from .events import decode_work
from .logs import configure, log
from .runtime import runtime, utc_now

configure()


def _configured_runtime(message_id: str | None):
    """The runtime, or None after a CRITICAL line: redelivery cannot fix configuration, so ack."""
    try:
        return runtime()
    except SettingsError as exc:
        log("CRITICAL", f"invalid settings: {exc}", outcome="failed", message_id=message_id)
        return None


def handle_vm_event(cloud_event) -> None:
    message_id = _message_id(cloud_event)
    rt = _configured_runtime(message_id)
    if rt is None:
        return
    try:
        work = decode_work(cloud_event.data, now=utc_now(), max_age=rt.settings.max_event_age)
    except BadMessage as exc:
        log("WARNING", f"message rejected: {exc}", outcome="rejected", message_id=message_id)
        return
    except Ignored as exc:
        log("INFO", f"message ignored: {exc}", outcome="ignored", message_id=message_id)
        return
    key, hints = work.key, work.log_fields()  # the sweep's hints: logged, never trusted
    if key.project not in rt.settings.vm_projects:
        log("WARNING", f"message rejected: project {key.project} is not among MESHJOIN_VM_PROJECTS", key=key,
            outcome="rejected", message_id=message_id, **hints)
        return
    try:
        # "prune" (the sweep saw meshjoin's registration of a VM it did not list as labelled) lets the
        # reconcile remove that registration when ITS OWN read finds the VM gone (404) or unlabelled,
        # even if the VM's metadata shows no trace of a join. For a live labelled VM it changes
        # nothing: the reconcile joins or renews from the VM's truth, whoever forged the message.
        outcome = rt.reconciler.reconcile(key, cleanup=work.work == "prune")
    except TransientError as exc:
        log("WARNING", f"transient failure, Pub/Sub will redeliver: {exc}", key=key, outcome="retrying",
            message_id=message_id, **hints)
        raise
    except Exception as exc:  # noqa: BLE001 - a bug one VM's data triggers: that VM's problem, logged and acked
        # Redelivering would replay the same crash five times into the dead-letter topic; the sweep retries.
        log("ERROR", f"reconcile failed unexpectedly: {type(exc).__name__}: {str(exc)[:300]}", key=key,
            outcome="failed", error_kind=type(exc).__name__, message_id=message_id, **hints)
        return
    log("INFO", f"{outcome.verb}: {outcome.reason}", key=key, outcome=outcome.verb, state=outcome.state,
        message_id=message_id, **hints, **_public(outcome.details))


def handle_schedule(cloud_event) -> None:
    """One sweep per tick. Always acked: the next tick is the retry, and a redelivered tick would
    only pile sweeps on top of each other."""
    message_id = _message_id(cloud_event)
    rt = _configured_runtime(message_id)
    if rt is None:
        return
    try:
        rt.sweeper.sweep()
    except Exception as exc:  # noqa: BLE001 - any failure: logged, acked, the next tick retries
        log("ERROR", f"sweep aborted: {type(exc).__name__}: {str(exc)[:300]}", outcome="failed",
            message_id=message_id)


def _message_id(cloud_event) -> str | None:
    data = getattr(cloud_event, "data", None)
    if isinstance(data, dict) and isinstance(data.get("message"), dict):
        value = data["message"].get("messageId")
        return str(value)[:64] if value is not None else None
    return None


def _public(details: dict) -> dict:
    """Outcome facts safe for a log line (names, times; never material)."""
    keep = ("identity", "workloadEntry", "keyId", "certSerial", "certNotAfter", "rekey", "address")
    return {k: details[k] for k in keep if k in details}
