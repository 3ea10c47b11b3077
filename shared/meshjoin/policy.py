"""Identity policy: which mesh identity a VM may take. Pure: (VM, settings) -> Identity | Denial.

A VM's owner asks through labels (GCE restricts label values to [a-z0-9_-], so they cannot carry
quotes or newlines) and the `mesh-ports` metadata item; meshjoin grants only what the operator's
allowlists permit, so creating a VM never lets anyone claim an identity outside policy.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from .model import Denial, Identity, Vm
from .settings import PROTECTED_NAMESPACES, Settings

NAMESPACE_LABEL = "mesh-namespace"
SERVICE_ACCOUNT_LABEL = "mesh-service-account"
APP_LABEL = "mesh-app"
VERSION_LABEL = "mesh-version"
PORTS_METADATA = "mesh-ports"  # e.g. "http:8080,grpc:9090"
MAX_PORTS = 32

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1123: namespaces, SAs
_SERVICE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035: Service names
_VERSION = re.compile(r"^[a-z0-9](?:[-a-z0-9_.]{0,61}[a-z0-9])?$")  # a Kubernetes label value
_PORT_NAME = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME, 15 chars


def decide_identity(vm: Vm, settings: Settings) -> Identity | Denial:
    labels = vm.labels
    namespace = labels.get(NAMESPACE_LABEL) or settings.default_namespace
    service_account = labels.get(SERVICE_ACCOUNT_LABEL) or settings.default_service_account
    app = labels.get(APP_LABEL) or vm.key.instance
    version = labels.get(VERSION_LABEL) or "latest"

    for what, value, pattern in (
        (f"namespace (label {NAMESPACE_LABEL})", namespace, _DNS_LABEL),
        (f"service account (label {SERVICE_ACCOUNT_LABEL})", service_account, _DNS_LABEL),
        (f"app (label {APP_LABEL})", app, _SERVICE_NAME),
        (f"version (label {VERSION_LABEL})", version, _VERSION),
    ):
        if not pattern.match(value):
            return Denial(f"{what} {value[:70]!r} is not a valid Kubernetes name")

    denial = namespace_denial(namespace, settings) or service_account_denial(namespace, service_account, settings)
    if denial:
        return denial
    if not vm.service_account:
        return Denial("the VM has no service account, so it could not read its certificate; "
                      "create it with --service-account")
    ports = parse_ports(vm.metadata.get(PORTS_METADATA, ""))
    if isinstance(ports, Denial):
        return ports
    return Identity(namespace=namespace, service_account=service_account, app=app, version=version, ports=ports)


def namespace_denial(namespace: str, settings: Settings) -> Denial | None:
    allowed = settings.allowed_namespaces
    if namespace in PROTECTED_NAMESPACES and namespace not in allowed:
        return Denial(f"namespace {namespace!r} is reserved for the platform; "
                      "only an explicit entry in MESHJOIN_ALLOWED_NAMESPACES allows it")
    if namespace not in allowed and "*" not in allowed:
        return Denial(f"namespace {namespace!r} is not in MESHJOIN_ALLOWED_NAMESPACES ({', '.join(allowed)})")
    return None


def service_account_denial(namespace: str, service_account: str, settings: Settings) -> Denial | None:
    subject = f"{namespace}/{service_account}"
    if any(fnmatchcase(subject, pattern) for pattern in settings.allowed_service_accounts):
        return None
    return Denial(f"service account {subject!r} is not allowed by MESHJOIN_ALLOWED_SERVICE_ACCOUNTS "
                  f"({', '.join(settings.allowed_service_accounts)})")


def parse_ports(raw: str) -> dict[str, int] | Denial:
    """`name:number` pairs separated by commas; anything else is refused with the offending part."""
    ports: dict[str, int] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, number = part.partition(":")
        if not sep or not _PORT_NAME.match(name) or not number.isdigit():
            return Denial(f"metadata {PORTS_METADATA}: {part[:40]!r} is not name:port (e.g. http:8080)")
        port = int(number)
        if not 1 <= port <= 65535:
            return Denial(f"metadata {PORTS_METADATA}: port {port} of {name!r} is outside 1-65535")
        if name in ports or port in ports.values():
            return Denial(f"metadata {PORTS_METADATA}: {part!r} repeats a port name or number")
        ports[name] = port
    if len(ports) > MAX_PORTS:
        return Denial(f"metadata {PORTS_METADATA}: more than {MAX_PORTS} ports")
    return ports
