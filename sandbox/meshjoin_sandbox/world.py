"""The sandbox's shared state: what every emulator in the world process can see.

One process (`python -m meshjoin_sandbox.server`) hosts the Compute, Secret Manager, GKE,
Kubernetes and metadata emulators, each on its own loopback port, around one `World`.

Identities: every bearer token the emulators accept names a `Principal` (an account email, its
numeric unique id and the OAuth scopes the token carries), issued by `World.issue_token` (for the
metadata server, the control API's `token --as`, and tests). `World.authenticate` turns a request
back into its principal, or answers 401 as Google does; `World.iam` then decides what it may do.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from werkzeug.wrappers import Request

from .lifecycle import Timing
from .web import ApiError

USERINFO_EMAIL = "https://www.googleapis.com/auth/userinfo.email"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

# Google's answer to a missing, malformed or unknown access token (401 UNAUTHENTICATED).
INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


def unique_id_of(email: str) -> str:
    """A Google account's numeric unique id: 21 digits, deterministic per email (real ones start with 1)."""
    digest = int.from_bytes(hashlib.sha256(email.lower().encode()).digest()[:16], "big")
    return "1" + str(digest % 10**20).zfill(20)


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for, and with which OAuth scopes."""

    email: str
    unique_id: str
    scopes: frozenset[str]

    @property
    def kube_username(self) -> str:
        """GKE names a Google token's user by email only if it carries userinfo.email, else by unique id."""
        return self.email if USERINFO_EMAIL in self.scopes else self.unique_id

    @property
    def is_service_account(self) -> bool:
        return self.email.endswith(".gserviceaccount.com")

    @property
    def member(self) -> str:
        """The IAM member string of this account (`serviceAccount:...` or `user:...`)."""
        return f"{'serviceAccount' if self.is_service_account else 'user'}:{self.email}"


@dataclass
class World:
    project: str = "meshjoin-sandbox"
    project_number: str = "123456789012"
    region: str = "us-central1"
    zone: str = "us-central1-a"
    cluster_name: str = "mesh"
    state_dir: str = ""
    # The functions' own identity, handed out by the metadata server.
    service_account: str = "meshjoin-functions@meshjoin-sandbox.iam.gserviceaccount.com"
    # The person at the terminal: project owner (IAM) and cluster-admin (RBAC).
    operator_email: str = "operator@example.com"
    # Long-lived tokens written to the sandbox config: the functions' account and the operator
    # (kubeconfig, CLI, gcloud), both with cloud-platform + userinfo.email.
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
    # Terraform variables the IAM (and RBAC) are evaluated with; None = the sandbox's defaults.
    terraform_vars: dict[str, Any] | None = None
    # The IAM policy every emulator enforces (built from deploy/terraform when not given).
    iam: Any = None
    # Every project the sandbox holds, id -> number, the host (`project`) first: each has its own
    # Compute emulator, VMs, quotas and guests (issue 16, "several projects").
    projects: dict[str, str] = field(default_factory=dict)
    _principals: dict[str, Principal] = field(default_factory=dict, repr=False)
    _issued: dict[tuple[str, frozenset[str]], str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.projects = {self.project: self.project_number,
                         **{p: n for p, n in self.projects.items() if p != self.project}}
        both = (CLOUD_PLATFORM, USERINFO_EMAIL)
        self._register(self.sa_token, self.service_account, both)
        self._register(self.admin_token, self.operator_email, both)
        if self.iam is None:
            from .iam import IamPolicy  # iam imports world's Principal

            self.iam = IamPolicy.from_terraform(self)

    @property
    def functions_email(self) -> str:
        return self.service_account

    @property
    def default_compute_sa(self) -> str:
        return f"{self.project_number}-compute@developer.gserviceaccount.com"

    def number_of(self, project: str) -> str:
        """A sandbox project's number (KeyError for a project the sandbox does not hold)."""
        return self.projects[project]

    def project_of_number(self, number: str) -> str | None:
        return next((p for p, n in self.projects.items() if n == number), None)

    def account_project(self, email: str) -> str:
        """The project a service account belongs to, as IAM infers it from `projects/-/serviceAccounts/
        EMAIL`: NAME@PROJECT.iam.gserviceaccount.com, or NUMBER-compute@developer.gserviceaccount.com
        (the default compute account of the project with that number); else the host project."""
        name, _, domain = email.partition("@")
        if domain.endswith(".iam.gserviceaccount.com"):
            return domain.removesuffix(".iam.gserviceaccount.com")
        if domain == "developer.gserviceaccount.com" and name.endswith("-compute"):
            return self.project_of_number(name.removesuffix("-compute")) or self.project
        return self.project

    def compute_for(self, project: str | None = None):
        """The Compute emulator of a sandbox project (None: the host's)."""
        if project in (None, self.project):
            return self.emulators["compute"]
        found = self.emulators.get(f"compute@{project}")
        if found is None:
            raise ApiError(404, f"the sandbox holds no project {project!r} (it holds {', '.join(self.projects)})")
        return found

    def guests_for(self, project: str | None = None):
        return self.emulators.get("guests" if project in (None, self.project) else f"guests@{project}")

    def default_terraform_vars(self) -> dict[str, Any]:
        """What `sandbox up` deploys with, for a World built without a SandboxConfig (tests)."""
        from .config import sandbox_terraform_vars

        return sandbox_terraform_vars(
            self.project, self.region,
            f"projects/{self.project}/locations/{self.region}/clusters/{self.cluster_name}", self.service_account)

    # ---- tokens ------------------------------------------------------------------------------------

    def _register(self, token: str, email: str, scopes: Iterable[str]) -> None:
        principal = Principal(email, unique_id_of(email), frozenset(scopes))
        with self.lock:
            self._principals[token] = principal
            self._issued.setdefault((email, principal.scopes), token)

    def issue_token(self, email: str, scopes: Iterable[str]) -> str:
        """An access token for `email` carrying `scopes` (the same token for the same pair)."""
        scope_set = frozenset(s.strip() for s in scopes if s.strip())
        if not email or "@" not in email:
            raise ApiError(400, f"not an account email: {email!r}", "INVALID_ARGUMENT")
        with self.lock:
            token = self._issued.get((email, scope_set))
            if token is None:
                token = "ya29.sandbox-" + secrets.token_urlsafe(24)
                self._register(token, email, scope_set)
            return token

    def principal_of(self, token: str) -> Principal | None:
        with self.lock:
            return self._principals.get(token)

    def authenticate(self, request: Request) -> Principal:
        """The caller's principal, or Google's 401 for an absent, malformed or unknown bearer token."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        principal = self.principal_of(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise ApiError(401, INVALID_CREDENTIALS, "UNAUTHENTICATED")
        return principal

    def check_bearer(self, request: Request) -> Principal:
        """401 unless the request carries a token the sandbox issued (kept for older callers)."""
        return self.authenticate(request)

    def tokens(self) -> set[str]:
        with self.lock:
            return set(self._principals)
