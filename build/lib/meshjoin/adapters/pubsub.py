"""Pub/Sub: the sweep publishes per-VM work to the events topic (one message per VM action).

The message is the operator's format plus two hints (events.py decodes and validates them, and
never trusts them): `{"project", "zone", "instance", "work": "join|renew|reissue|prune",
"sweep": "<sweep id>"}`. The events function's instances then do the work in parallel: Pub/Sub's
push delivery and Cloud Functions' autoscaling are the engine, with nothing of meshjoin's own
between them.

google-cloud-pubsub's `PublisherClient` batches messages (one Publish RPC carries up to
`BATCH_MAX_MESSAGES`) and retries transient failures itself until the publish `timeout`. Every future
is awaited with a deadline; a message that failed or timed out is reported to the caller as that
VM's failure (the sweep defers it to its next tick), never raised: one failed publish must not stop
a sweep.

Where it publishes, by configuration only: `PUBSUB_EMULATOR_HOST` (the client library's own switch to
an emulator, which the sandbox exports), else `MESHJOIN_PUBSUB_ENDPOINT` (an API endpoint override,
spoken over REST), else Google's endpoint. Permission: `pubsub.topics.publish` on the events topic
(deploy/terraform/iam.tf grants the functions' account roles/pubsub.publisher there).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, Sequence

BATCH_MAX_MESSAGES = 100  # per Publish RPC (the API allows 1,000 and 10 MB; ours are ~150 bytes)
BATCH_MAX_LATENCY = 0.05  # seconds a batch waits to fill: the sweep publishes all its work at once


@dataclass(frozen=True)
class PublishResult:
    """One message's fate: its Pub/Sub message id, or why it was not published."""

    message_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.message_id is not None


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode()


class Publisher(Protocol):
    """What the sweep asks of Pub/Sub: `PubSubPublisher` here, `fake_pubsub.InMemoryPublisher` in tests.

    tests/unit/test_ports.py holds both to this signature.
    """

    def publish(self, messages: Sequence[dict], *, timeout: float | None = None) -> list[PublishResult]: ...


class PubSubPublisher:
    """Publishes JSON messages to one topic in batches and waits for every one of them."""

    def __init__(self, settings, credentials, topic: str | None = None):
        self._settings = settings
        self._credentials = credentials
        self.topic = topic or settings.events_topic
        if not self.topic:
            raise ValueError("no topic to publish to: MESHJOIN_EVENTS_TOPIC is not set")

    @cached_property
    def _client(self):
        from google.cloud import pubsub_v1

        batching = pubsub_v1.types.BatchSettings(max_messages=BATCH_MAX_MESSAGES, max_latency=BATCH_MAX_LATENCY)
        if os.environ.get("PUBSUB_EMULATOR_HOST"):
            # The library connects to the emulator itself (plain gRPC, anonymous credentials).
            return pubsub_v1.PublisherClient(batch_settings=batching)
        if self._settings.pubsub_endpoint:
            return pubsub_v1.PublisherClient(batch_settings=batching, transport="rest", credentials=self._credentials,
                                             client_options={"api_endpoint": self._settings.pubsub_endpoint})
        return pubsub_v1.PublisherClient(batch_settings=batching, credentials=self._credentials)

    def publish(self, messages: Sequence[dict], *, timeout: float | None = None) -> list[PublishResult]:
        """Publish every message; answers one result per message, in order. Never raises for a
        message's failure (permission, quota, timeout): that message's result carries it."""
        timeout = timeout if timeout is not None else self._settings.api_timeout.total_seconds()
        futures = []
        for message in messages:
            try:
                futures.append(self._client.publish(self.topic, encode(message), timeout=timeout))
            except Exception as exc:  # noqa: BLE001 - a refused message (client stopped, too large) is that VM's
                futures.append(exc)
        results = []
        for future in futures:
            if isinstance(future, Exception):
                results.append(PublishResult(error=f"{type(future).__name__}: {str(future)[:200]}"))
                continue
            try:
                # The client's own retries end at `timeout`; the margin covers the batch's latency.
                results.append(PublishResult(message_id=str(future.result(timeout=timeout + 5))))
            except FutureTimeout:
                results.append(PublishResult(error=f"no answer within {timeout + 5:.0f}s"))
            except Exception as exc:  # noqa: BLE001 - the publish failed (permission, quota, ...): this VM's deferral
                results.append(PublishResult(error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        return results
