"""Request counts per API method, for benchmarks (`GET /stats`, `DELETE /stats` on the control plane).

`counted(name, app)` wraps an emulator's WSGI app (a `RoutedApp`): each request whose path matches a
route counts once under its endpoint ("instances.get", "secrets.versions.add"); on the Kubernetes API,
whose endpoints are verbs, the resource plural is added ("create workloadentries"). The route is the one
the app itself matched (`web.matched_route`): the path is parsed once.
"""

from __future__ import annotations

import threading
from collections import Counter

from .web import matched_route


class CountingApp:
    def __init__(self, app):
        self.app = app
        self.calls: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        try:
            return self.app(environ, start_response)
        finally:  # also when a fault drops the connection
            matched = matched_route(environ)
            if matched is not None:
                endpoint, args = matched
                label = f"{endpoint} {args['plural']}" if "plural" in args else endpoint
                with self.lock:
                    self.calls[label] += 1

    def counts(self, reset: bool = False) -> dict[str, int]:
        with self.lock:
            out = dict(self.calls)
            if reset:
                self.calls.clear()
        return out


COUNTERS: dict[str, CountingApp] = {}


def counted(name: str, app) -> CountingApp:
    COUNTERS[name] = CountingApp(app)
    return COUNTERS[name]


def snapshot(reset: bool = False) -> dict[str, dict[str, int]]:
    return {name: counter.counts(reset) for name, counter in sorted(COUNTERS.items())}
