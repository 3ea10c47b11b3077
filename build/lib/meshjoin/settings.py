"""Settings: one frozen object built from environment variables once per process.

Every invalid value fails at cold start with a message naming the variable, so a bad deployment
shows up in its first log line instead of as odd behaviour later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

from .errors import SettingsError
from .pki import KEY_ALGORITHMS

# Namespaces of the platform: no identity binding may name them (the functions would get write
# RBAC there, and a VM would speak as the mesh's or the cluster's own components).
PROTECTED_NAMESPACES = frozenset({"istio-system", "istio-ingress", "kube-system", "kube-public", "kube-node-lease",
                                  "cert-manager"})
PROTECTED_PREFIXES = ("kube-", "gke-", "gmp-", "istio-")  # GKE's managed (gke-*, gmp-*) and Istio's own


def protected_namespace(namespace: str) -> bool:
    return namespace in PROTECTED_NAMESPACES or namespace.startswith(PROTECTED_PREFIXES)


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_CLUSTER = re.compile(r"projects/[^/]+/locations/[^/]+/clusters/[^/]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # values reach cluster.env and /etc/hosts: one line each
_TOPIC = re.compile(r"projects/[a-z][-a-z0-9.:]{4,62}/topics/[A-Za-z][-A-Za-z0-9_.~+%]{2,254}")
_HOST_PORT = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}")
# A Google service account: NAME@PROJECT.iam.gserviceaccount.com, or a Google-managed one such as the
# default compute account NUMBER-compute@developer.gserviceaccount.com.
_GSA = re.compile(r"[a-z0-9][-a-z0-9]{0,62}@[a-z0-9][-a-z0-9.:]{0,100}\.gserviceaccount\.com")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123: namespaces, service accounts
_SERVICE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035: Service names (apps)
# A project id as GCE names it in a VM's resource name (events._PROJECT accepts the same): 6-30
# characters, or a domain-scoped `example.com:proj`.
_PROJECT_ID = re.compile(r"(?:[a-z][a-z0-9.-]{0,62}:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
BINDING_FIELDS = ("gsa", "namespace", "serviceAccount", "apps")
# Replaced by MESHJOIN_IDENTITY_BINDINGS; a deployment still setting one is refused at start.
RETIRED_SETTINGS = ("MESHJOIN_ALLOWED_NAMESPACES", "MESHJOIN_ALLOWED_SERVICE_ACCOUNTS",
                    "MESHJOIN_DEFAULT_NAMESPACE", "MESHJOIN_DEFAULT_SERVICE_ACCOUNT")


@dataclass(frozen=True)
class IdentityBinding:
    """The operator's grant: a VM running as Google service account `gsa` may be the Kubernetes
    identity `namespace/service_account`, with the `app` label of one of `apps` (and so become an
    endpoint of the Services selecting those apps)."""

    gsa: str
    namespace: str
    service_account: str
    apps: tuple[str, ...]

    @property
    def subject(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def parse_identity_bindings(raw: str) -> tuple[IdentityBinding, ...]:
    """MESHJOIN_IDENTITY_BINDINGS: a JSON list of {"gsa", "namespace", "serviceAccount", "apps"}."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError('want a JSON list of {"gsa", "namespace", "serviceAccount", "apps"} objects')
    bindings: list[IdentityBinding] = []
    for index, item in enumerate(data):
        where = f"binding #{index + 1}"
        if not isinstance(item, dict) or set(item) != set(BINDING_FIELDS):
            raise ValueError(f"{where} must be an object with exactly the keys {', '.join(BINDING_FIELDS)}")
        gsa, namespace, ksa, apps = (item[k] for k in BINDING_FIELDS)
        for what, value, pattern in (("gsa", gsa, _GSA), ("namespace", namespace, _DNS_LABEL),
                                     ("serviceAccount", ksa, _DNS_LABEL)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"{where}: {what} {str(value)[:80]!r} is not a valid "
                                 f"{'service account email' if what == 'gsa' else 'Kubernetes name'}")
        if protected_namespace(namespace):
            raise ValueError(f"{where}: namespace {namespace!r} belongs to the platform (istio-*, kube-*, gke-*, "
                             "gmp-*, cert-manager); no VM may join there")
        if not isinstance(apps, list) or not apps or \
                not all(isinstance(a, str) and _SERVICE_NAME.fullmatch(a) for a in apps) or len(set(apps)) != len(apps):
            raise ValueError(f"{where}: apps must be a non-empty list of distinct Service names (RFC 1035)")
        binding = IdentityBinding(gsa, namespace, ksa, tuple(apps))
        if any((b.gsa, b.subject) == (gsa, binding.subject) for b in bindings):
            raise ValueError(f"{where}: {gsa} -> {binding.subject} is bound twice")
        bindings.append(binding)
    return tuple(bindings)


def parse_duration(value: str) -> timedelta:
    match = _DURATION.fullmatch(value.strip())
    if not value.strip() or not match:
        raise ValueError(f"not a duration like 24h, 90m or 1h30m: {value!r}")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


@dataclass(frozen=True)
class Settings:
    project: str
    cluster: str  # projects/P/locations/L/clusters/C
    compute_endpoint: str | None = None
    secretmanager_endpoint: str | None = None
    container_endpoint: str | None = None
    cluster_endpoint: str = "ip"  # "ip": clusters.get's endpoint + cluster CA; "dns": GKE's DNS-based endpoint
    ca_cert_secret: str = "istio-ca-cert"
    ca_key_secret: str = "istio-ca-key"
    ca_chain_secret: str = "istio-cert-chain"
    ca_root_secret: str = "istio-root-cert"
    ca_cache: timedelta = timedelta(seconds=60)
    trust_domain: str = "cluster.local"
    identity_bindings: tuple[IdentityBinding, ...] = ()  # default-deny: no binding, no join
    cert_ttl: timedelta = timedelta(hours=24)
    renew_fraction: float = 0.5
    renew_jitter_fraction: float = 0.1
    key_algorithm: str = "ecdsa-p256"  # what the VMs' agents generate, and the only key type certified
    # Ask a VM's agent for a new key when a re-certification would make its key's certificate count
    # exceed this (renewals, CA re-issues); 0: never ask (MESHJOIN_KEY_ROTATION_RENEWALS).
    key_rotation_renewals: int = 3
    istiod_address: str = "istiod.istio-system.svc:15012"
    istiod_ip: str = ""
    mesh_id: str = ""
    cluster_id: str = "Kubernetes"
    network: str = ""
    max_event_age: timedelta = timedelta(hours=1)
    secret_prefix: str = "meshjoin-vm"
    api_attempts: int = 4
    api_timeout: timedelta = timedelta(seconds=30)  # per API call; a hung call is then a transient failure
    prune_cap: int = 50
    # Optional upper bound on the per-VM works one sweep publishes (MESHJOIN_SWEEP_RENEWALS, kept from
    # the fixed-budget days); None: the quota model alone decides (capacity.sweep_work_budget).
    sweep_renewals: int | None = None
    sweep_seconds: timedelta = timedelta(minutes=4)
    sweep_workers: int = 8
    sidecar_url: str = ""
    sidecar_sha256: str = ""
    # The VM's own truth (issue 13): where the agent nudges meshjoin after confirming, and how long
    # a VM may wait unconfirmed before the sweep reports it.
    events_topic: str = ""  # projects/P/topics/T (a bare id means this project's topic)
    pubsub_endpoint: str | None = None
    confirm_timeout: timedelta = timedelta(minutes=15)
    # Per-minute API quotas of the project, and the share one process may use (issue 13, defect 8).
    quota_share: float = 0.5
    secretmanager_reads_per_minute: int = 600  # the CA reads, the legacy per-VM secret listing
    secretmanager_writes_per_minute: int = 600
    compute_reads_per_minute: int = 1500
    compute_writes_per_minute: int = 1500
    # --- pacing of the sweep's published work (issue 16; shared/meshjoin/capacity.py) ---
    # How often Cloud Scheduler ticks (Terraform's sweep_interval_minutes): the sweep's work budget
    # is a per-minute pace times this.
    sweep_interval: timedelta = timedelta(minutes=10)
    # Share of each per-minute quota left to callers that are not meshjoin's functions (operators,
    # consoles, other tools). Terraform checks events max_instances x MESHJOIN_QUOTA_SHARE <= 1 - this.
    quota_reserve: float = 0.2
    # Share of each per-minute quota the work one sweep publishes may use, spread over the interval;
    # what is left of meshjoin's part goes to event traffic (new VMs, label changes, the agents' nudges).
    sweep_work_share: float = 0.4
    extra: Mapping[str, str] = field(default_factory=dict)
    # --- several projects (issue 16) ---
    # Every project whose VMs meshjoin manages, the host project (`project`: functions, Pub/Sub,
    # Secret Manager) first (MESHJOIN_VM_PROJECTS); empty means the host project alone.
    vm_projects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The host project is always managed and always first; the rest keep their order, once each.
        object.__setattr__(self, "vm_projects", tuple(dict.fromkeys((self.project, *self.vm_projects))))

    @property
    def cluster_location(self) -> str:
        return self.cluster.split("/")[3]

    def bindings_for(self, gsa: str) -> tuple[IdentityBinding, ...]:
        return tuple(b for b in self.identity_bindings if b.gsa == gsa)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Build and validate from `MESHJOIN_*` variables; `SettingsError` names the bad one."""
        values: dict = {}

        def text(name: str, attr: str, required: bool = False) -> None:
            value = env.get(name, "").strip()
            if _CONTROL.search(value):
                raise SettingsError(f"{name}={value[:80]!r} is invalid: control characters (newlines) are not allowed")
            if value:
                values[attr] = value
            elif required:
                raise SettingsError(f"{name} is required but not set")

        def convert(name: str, attr: str, parse) -> None:
            raw = env.get(name, "").strip()
            if not raw:
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from None

        text("MESHJOIN_PROJECT", "project", required=True)
        text("MESHJOIN_CLUSTER", "cluster", required=True)
        if not _CLUSTER.fullmatch(values["cluster"]):
            raise SettingsError(
                f"MESHJOIN_CLUSTER={values['cluster']!r} is invalid: want projects/P/locations/L/clusters/C")
        for name, attr in [
            ("MESHJOIN_COMPUTE_ENDPOINT", "compute_endpoint"),
            ("MESHJOIN_SECRETMANAGER_ENDPOINT", "secretmanager_endpoint"),
            ("MESHJOIN_CONTAINER_ENDPOINT", "container_endpoint"),
            ("MESHJOIN_CA_CERT_SECRET", "ca_cert_secret"),
            ("MESHJOIN_CA_KEY_SECRET", "ca_key_secret"),
            ("MESHJOIN_CA_CHAIN_SECRET", "ca_chain_secret"),
            ("MESHJOIN_CA_ROOT_SECRET", "ca_root_secret"),
            ("MESHJOIN_TRUST_DOMAIN", "trust_domain"),
            ("MESHJOIN_ISTIOD_ADDRESS", "istiod_address"),
            ("MESHJOIN_ISTIOD_IP", "istiod_ip"),
            ("MESHJOIN_MESH_ID", "mesh_id"),
            ("MESHJOIN_CLUSTER_ID", "cluster_id"),
            ("MESHJOIN_NETWORK", "network"),
            ("MESHJOIN_SECRET_PREFIX", "secret_prefix"),
            ("MESHJOIN_SIDECAR_URL", "sidecar_url"),
            ("MESHJOIN_SIDECAR_SHA256", "sidecar_sha256"),
            ("MESHJOIN_EVENTS_TOPIC", "events_topic"),
            ("MESHJOIN_PUBSUB_ENDPOINT", "pubsub_endpoint"),
        ]:
            text(name, attr)
        convert("MESHJOIN_ISTIOD_IP", "istiod_ip", _ip_address)
        convert("MESHJOIN_ISTIOD_ADDRESS", "istiod_address", _host_port)
        for name, attr in [("MESHJOIN_MESH_ID", "mesh_id"), ("MESHJOIN_CLUSTER_ID", "cluster_id"),
                           ("MESHJOIN_NETWORK", "network")]:
            convert(name, attr, _mesh_name)
        convert("MESHJOIN_TRUST_DOMAIN", "trust_domain", _trust_domain)
        convert("MESHJOIN_API_TIMEOUT", "api_timeout", parse_duration)
        for retired in RETIRED_SETTINGS:
            if env.get(retired, "").strip():
                # Silently ignoring an old allowlist would make an upgrade deny every VM without a word.
                raise SettingsError(f"{retired} is no longer read: identities come from MESHJOIN_IDENTITY_BINDINGS "
                                    "(README, \"Who may join: identity bindings\")")
        convert("MESHJOIN_IDENTITY_BINDINGS", "identity_bindings", parse_identity_bindings)
        convert("MESHJOIN_CERT_TTL", "cert_ttl", parse_duration)
        convert("MESHJOIN_CA_CACHE", "ca_cache", parse_duration)
        convert("MESHJOIN_MAX_EVENT_AGE", "max_event_age", parse_duration)
        convert("MESHJOIN_RENEW_FRACTION", "renew_fraction", _fraction)
        convert("MESHJOIN_RENEW_JITTER", "renew_jitter_fraction", _fraction)
        convert("MESHJOIN_API_ATTEMPTS", "api_attempts", _positive_int)
        convert("MESHJOIN_KEY_ALGORITHM", "key_algorithm", _key_algorithm)
        convert("MESHJOIN_KEY_ROTATION_RENEWALS", "key_rotation_renewals", _non_negative_int)
        convert("MESHJOIN_PRUNE_CAP", "prune_cap", _positive_int)
        convert("MESHJOIN_SWEEP_RENEWALS", "sweep_renewals", _positive_int)
        convert("MESHJOIN_SWEEP_SECONDS", "sweep_seconds", parse_duration)
        convert("MESHJOIN_SWEEP_WORKERS", "sweep_workers", _positive_int)
        convert("MESHJOIN_CONFIRM_TIMEOUT", "confirm_timeout", parse_duration)
        convert("MESHJOIN_QUOTA_SHARE", "quota_share", _share)
        convert("MESHJOIN_SECRETMANAGER_READS_PER_MINUTE", "secretmanager_reads_per_minute", _positive_int)
        convert("MESHJOIN_SECRETMANAGER_WRITES_PER_MINUTE", "secretmanager_writes_per_minute", _positive_int)
        convert("MESHJOIN_COMPUTE_READS_PER_MINUTE", "compute_reads_per_minute", _positive_int)
        convert("MESHJOIN_COMPUTE_WRITES_PER_MINUTE", "compute_writes_per_minute", _positive_int)
        # Pacing of the sweep's published work (issue 16).
        convert("MESHJOIN_SWEEP_INTERVAL", "sweep_interval", parse_duration)
        convert("MESHJOIN_QUOTA_RESERVE", "quota_reserve", _fraction)
        convert("MESHJOIN_SWEEP_WORK_SHARE", "sweep_work_share", _share)
        if "events_topic" in values and "/" not in values["events_topic"]:
            values["events_topic"] = f"projects/{values['project']}/topics/{values['events_topic']}"
        if "events_topic" in values and not _TOPIC.fullmatch(values["events_topic"]):
            raise SettingsError(f"MESHJOIN_EVENTS_TOPIC={values['events_topic']!r} is invalid: "
                                "want projects/P/topics/T or a topic id")
        convert("MESHJOIN_CLUSTER_ENDPOINT", "cluster_endpoint", _cluster_endpoint)
        convert("MESHJOIN_VM_PROJECTS", "vm_projects", parse_vm_projects)
        settings = cls(**values)
        if settings.cert_ttl < timedelta(minutes=1):
            raise SettingsError(f"MESHJOIN_CERT_TTL must be at least 1m, got {settings.cert_ttl}")
        if settings.renew_fraction + settings.renew_jitter_fraction >= 1:
            raise SettingsError("MESHJOIN_RENEW_FRACTION + MESHJOIN_RENEW_JITTER must stay below 1")
        if settings.sweep_interval < timedelta(minutes=1):
            raise SettingsError(f"MESHJOIN_SWEEP_INTERVAL must be at least 1m, got {settings.sweep_interval}")
        if settings.sweep_work_share > 1 - settings.quota_reserve + 1e-9:
            raise SettingsError("MESHJOIN_SWEEP_WORK_SHARE must not exceed 1 - MESHJOIN_QUOTA_RESERVE "
                                f"({settings.sweep_work_share} > 1 - {settings.quota_reserve})")
        if settings.api_timeout < timedelta(seconds=1):
            raise SettingsError(f"MESHJOIN_API_TIMEOUT must be at least 1s, got {settings.api_timeout}")
        return settings


def parse_vm_projects(raw: str) -> tuple[str, ...]:
    """MESHJOIN_VM_PROJECTS: comma-separated project ids (the host project is added first anyway)."""
    projects = [p.strip() for p in raw.split(",") if p.strip()]
    for project in projects:
        if not _PROJECT_ID.fullmatch(project):
            raise ValueError(f"{project[:80]!r} is not a project id (6-30 lowercase letters, digits and hyphens, "
                             "starting with a letter; or example.com:proj)")
    return tuple(projects)


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 1:
        raise ValueError("must be a fraction in [0, 1)")
    return value


def _share(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be a fraction in (0, 1]")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or a positive integer")
    return value


def _ip_address(raw: str) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


def _host_port(raw: str) -> str:
    if not _HOST_PORT.fullmatch(raw):
        raise ValueError("want HOST:PORT, e.g. istiod.istio-system.svc:15012")
    return raw


# Istio's mesh, cluster and network names as meshjoin accepts them: one token of letters, digits and
# `-_.` (they land in cluster.env, the mesh config and labels; a control or line-separator character in
# one would be a broken line for some reader of those files).
_MESH_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _mesh_name(raw: str) -> str:
    if not _MESH_NAME.fullmatch(raw):
        raise ValueError("want 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    return raw


# SPIFFE ID spec, "Trust Domain": lower-case letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


def _trust_domain(raw: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(raw):
        raise ValueError("a SPIFFE trust domain has only lower-case letters, digits, '.', '-' and '_'")
    return raw


def _cluster_endpoint(raw: str) -> str:
    if raw not in ("ip", "dns"):
        raise ValueError("must be ip or dns")
    return raw


def _key_algorithm(raw: str) -> str:
    if raw not in KEY_ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(KEY_ALGORITHMS)}")
    return raw
