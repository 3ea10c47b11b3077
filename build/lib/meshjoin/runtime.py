"""Per-process wiring: settings at first use, credentials and clients built lazily, once.

Cloud Functions reuses a process for many events; building clients per event would pay their
setup (and the Kubernetes clusters.get) every time, building them at import would slow cold start.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from functools import cached_property

from .settings import Settings

# userinfo.email as well as cloud-platform: GKE identifies a Google access token by the account's
# email only when the token carries this scope, by its numeric id otherwise, and the RBAC bindings
# (deploy/terraform/kubernetes.tf) name the functions' account by email.
SCOPES = ["https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/userinfo.email"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Runtime:
    def __init__(self, settings: Settings, credentials=None):
        self.settings = settings
        self._credentials = credentials
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "Runtime":
        return cls(Settings.from_env(os.environ))

    @cached_property
    def credentials(self):
        if self._credentials is None:
            import google.auth

            self._credentials, _ = google.auth.default(scopes=SCOPES)
        return self._credentials

    @cached_property
    def compute(self):
        from .adapters.compute import ComputeAdapter

        return ComputeAdapter(self.settings, self.credentials)

    @cached_property
    def secrets(self):
        from .adapters.secrets import SecretsAdapter

        return SecretsAdapter(self.settings, self.credentials)

    @cached_property
    def kube(self):
        from .adapters.kube import KubeAdapter

        return KubeAdapter(self.settings, self.credentials)

    @cached_property
    def reconciler(self):
        from .reconcile import Reconciler

        with self._lock:
            return Reconciler(self.settings, self.compute, self.secrets, self.kube, clock=utc_now)

    @cached_property
    def publisher(self):
        """The events topic's publisher (the sweep's per-VM work), or None without MESHJOIN_EVENTS_TOPIC
        (the sweep then works inline)."""
        if not self.settings.events_topic:
            return None
        from .adapters.pubsub import PubSubPublisher

        return PubSubPublisher(self.settings, self.credentials)

    @cached_property
    def sweeper(self):
        from .sweep import Sweeper

        return Sweeper(self.settings, self.reconciler, clock=utc_now, publisher=self.publisher)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """The process-wide runtime (functions); built on first event so a settings error is logged then."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime.from_env()
        return _runtime
