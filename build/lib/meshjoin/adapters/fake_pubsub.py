"""An in-memory stand-in for `PubSubPublisher` (unit tests and the paper benchmark), the `Publisher` port's
fake (pubsub.Publisher; tests/unit/test_ports.py keeps their signatures equal): it records what would have
been published, and fails the messages it is told to fail, as the real one reports them."""

from __future__ import annotations

import json
from typing import Callable, Sequence

from .pubsub import PublishResult, encode


class InMemoryPublisher:
    def __init__(self, topic: str = "projects/p/topics/events", fail: Callable[[dict], str | None] | None = None):
        self.topic = topic
        self.published: list[dict] = []  # decoded, exactly as encoded on the wire
        self._fail = fail  # message -> error text (that message fails) or None
        self.batches = 0

    def publish(self, messages: Sequence[dict], *, timeout: float | None = None) -> list[PublishResult]:
        self.batches += 1
        results = []
        for message in messages:
            error = self._fail(message) if self._fail else None
            if error:
                results.append(PublishResult(error=error))
                continue
            self.published.append(json.loads(encode(message)))
            results.append(PublishResult(message_id=str(len(self.published))))
        return results
