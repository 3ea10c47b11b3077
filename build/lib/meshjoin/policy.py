"""Identity policy: which mesh identity a VM may take. Pure: (VM, settings) -> Identity | Denial.

The boundary is the VM's Google service account, not its labels: anyone who may edit a VM can
relabel it, but running a VM as an account needs `iam.serviceAccounts.actAs` on it (as GKE Workload
Identity binds Kubernetes identities to Google accounts). The operator's identity bindings
(MESHJOIN_IDENTITY_BINDINGS) say which Kubernetes identities and apps each account may take; the
labels only choose among those. An account bound to nothing is denied (default-deny), and so is the
project's default compute account unless an operator binds it on purpose.

GCE restricts label values to [a-z0-9_-], so they cannot carry quotes or newlines; `mesh-ports` is
free-form metadata and parsed strictly.
"""

from __future__ import annotations

import re

from .model import Denial, Identity, Vm
from .settings import IdentityBinding, Settings

NAMESPACE_LABEL = "mesh-namespace"
SERVICE_ACCOUNT_LABEL = "mesh-service-account"
APP_LABEL = "mesh-app"
VERSION_LABEL = "mesh-version"
PORTS_METADATA = "mesh-ports"  # e.g. "http:8080,grpc:9090"
MAX_PORTS = 32
MAX_LISTED = 5  # bindings named in one denial reason

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123: namespaces, SAs
_SERVICE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035: Service names
_VERSION = re.compile(r"[a-z0-9](?:[-a-z0-9_.]{0,61}[a-z0-9])?")  # a Kubernetes label value
_PORT_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?")  # IANA_SVC_NAME, 15 chars
_PORT_NUMBER = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also accepts '²'


def decide_identity(vm: Vm, settings: Settings) -> Identity | Denial:
    account = vm.service_account
    if not account:
        return Denial("the VM has no service account, so it could not read its certificate; "
                      "create it with --service-account NAME@PROJECT.iam.gserviceaccount.com")
    bindings = settings.bindings_for(account)
    if not bindings:
        return unbound_denial(account)

    labels = vm.labels
    for what, label, pattern in (("namespace", NAMESPACE_LABEL, _DNS_LABEL),
                                 ("service account", SERVICE_ACCOUNT_LABEL, _DNS_LABEL),
                                 ("app", APP_LABEL, _SERVICE_NAME), ("version", VERSION_LABEL, _VERSION)):
        value = labels.get(label)
        if value is not None and not pattern.fullmatch(value):
            return Denial(f"{what} (label {label}) {value[:70]!r} is not a valid Kubernetes name")
    namespace, service_account = labels.get(NAMESPACE_LABEL), labels.get(SERVICE_ACCOUNT_LABEL)
    candidates = [b for b in bindings if namespace in (None, b.namespace) and service_account in (None, b.service_account)]
    if not candidates:
        asked = f"{namespace or '*'}/{service_account or '*'}"
        return Denial(f"service account {account} is not bound to {asked}; it may be {_subjects(bindings)} "
                      "(MESHJOIN_IDENTITY_BINDINGS)")
    if len(candidates) > 1:
        return Denial(f"service account {account} is bound to several identities ({_subjects(candidates)}): "
                      f"choose one with the labels {NAMESPACE_LABEL} and {SERVICE_ACCOUNT_LABEL}")
    binding = candidates[0]
    app = labels.get(APP_LABEL) or binding.apps[0]
    if app not in binding.apps:
        return Denial(f"app {app!r} is not among the apps {account} may serve as {binding.subject} "
                      f"({', '.join(binding.apps[:MAX_LISTED])}{', ...' if len(binding.apps) > MAX_LISTED else ''})")
    version = labels.get(VERSION_LABEL) or "latest"
    ports = parse_ports(vm.metadata.get(PORTS_METADATA, ""))
    if isinstance(ports, Denial):
        return ports
    return Identity(namespace=binding.namespace, service_account=binding.service_account, app=app, version=version,
                    ports=ports)


def unbound_denial(account: str) -> Denial:
    """A VM whose account no binding names. meshjoin may not act as that account (Terraform grants
    actAs on bound accounts only), so it cannot even write this reason into the VM's metadata."""
    if is_default_compute_account(account):
        reason = (f"the VM runs as the project's default compute service account {account}, which no identity "
                  "binding names: every VM on that account could obtain the identity it is bound to; give the VM "
                  "a dedicated service account and bind it")
    else:
        reason = f"service account {account} is bound to no mesh identity (MESHJOIN_IDENTITY_BINDINGS)"
    return Denial(reason, account_bound=False)


def is_default_compute_account(account: str | None) -> bool:
    """`NUMBER-compute@developer.gserviceaccount.com` is the project default, shared by every VM using it."""
    return bool(account) and re.fullmatch(r"[0-9]+-compute@developer\.gserviceaccount\.com", account) is not None


def _subjects(bindings: list[IdentityBinding] | tuple[IdentityBinding, ...]) -> str:
    listed = ", ".join(b.subject for b in bindings[:MAX_LISTED])
    return listed + (f" and {len(bindings) - MAX_LISTED} more" if len(bindings) > MAX_LISTED else "")


def parse_ports(raw: str) -> dict[str, int] | Denial:
    """`name:number` pairs separated by commas; anything else is refused with the offending part."""
    ports: dict[str, int] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, number = part.partition(":")
        if not sep or not _PORT_NAME.fullmatch(name) or not _PORT_NUMBER.fullmatch(number):
            return Denial(f"metadata {PORTS_METADATA}: {part[:40]!r} is not name:port (e.g. http:8080)")
        port = int(number)
        if not 1 <= port <= 65535:
            return Denial(f"metadata {PORTS_METADATA}: port {port} of {name!r} is outside 1-65535")
        if name in ports or port in ports.values():
            return Denial(f"metadata {PORTS_METADATA}: {part[:40]!r} repeats a port name or number")
        ports[name] = port
        if len(ports) > MAX_PORTS:
            return Denial(f"metadata {PORTS_METADATA}: more than {MAX_PORTS} ports")
    return ports
