"""The sandbox's shared state: what every emulator in the world process can see.

One process (`python -m meshjoin_sandbox.server`) hosts the Compute, Secret Manager, GKE,
Kubernetes and metadata emulators, each on its own loopback port, around one `World`.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from werkzeug.wrappers import Request

from .lifecycle import Timing
from .web import ApiError


@dataclass
class World:
    project: str = "meshjoin-sandbox"
    project_number: str = "123456789012"
    region: str = "us-central1"
    zone: str = "us-central1-a"
    cluster_name: str = "mesh"
    state_dir: str = ""
    # The functions' own identity, handed out by the metadata server.
    service_account: str = "meshjoin@meshjoin-sandbox.iam.gserviceaccount.com"
    # Bearer tokens the emulators accept: the metadata server's and the operator's (kubeconfig, CLI).
    sa_token: str = field(default_factory=lambda: "ya29.sandbox-sa-" + secrets.token_hex(12))
    admin_token: str = field(default_factory=lambda: "ya29.sandbox-admin-" + secrets.token_hex(12))
    kube_endpoint: str = ""  # "127.0.0.1:PORT", as GKE's clusters.get reports it
    kube_ca_pem: str = ""  # the cluster CA certificate (PEM)
    # Called with a Cloud Audit Log LogEntry (dict) for each Compute mutation: the Log Router sink.
    publish_audit: Callable[[dict], None] = lambda entry: None
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Emulators register themselves here by name ("compute", "secretmanager", ...).
    emulators: dict[str, Any] = field(default_factory=dict)
    # How long boots, stops and operations take, and the sandbox time factor (lifecycle.py).
    timing: Timing = field(default_factory=Timing)

    @property
    def default_compute_sa(self) -> str:
        return f"{self.project_number}-compute@developer.gserviceaccount.com"

    def tokens(self) -> set[str]:
        return {self.sa_token, self.admin_token}

    def check_bearer(self, request: Request) -> None:
        """401 unless the request carries one of the sandbox's bearer tokens, like a real API."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens():
            raise ApiError(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
