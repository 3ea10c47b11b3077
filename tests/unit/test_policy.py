"""Identity policy: what a VM's labels may claim, table-driven."""

from __future__ import annotations

import pytest

from meshjoin.model import Denial, Identity, Vm, VmKey
from meshjoin.policy import decide_identity, parse_ports
from meshjoin.settings import Settings

SETTINGS = Settings(
    project="my-project", cluster="projects/my-project/locations/us-central1/clusters/mesh",
    allowed_namespaces=("default", "apps", "payments"),
    allowed_service_accounts=("*/default", "apps/*", "payments/checkout"),
)


def vm(labels=None, metadata=None, sa="vm-1@my-project.iam.gserviceaccount.com") -> Vm:
    return Vm(key=VmKey("my-project", "us-central1-a", "vm-1"), instance_id="1",
              labels={"mesh": "join", **(labels or {})}, metadata=metadata or {}, metadata_fingerprint="f",
              network_ip="10.0.0.2", service_account=sa)


@pytest.mark.parametrize("labels, metadata, expected", [
    pytest.param({}, {}, Identity("default", "default", "vm-1", "latest", {}), id="all defaults"),
    pytest.param({"mesh-namespace": "apps", "mesh-service-account": "orders", "mesh-app": "orders",
                  "mesh-version": "v2"}, {"mesh-ports": "http:8080, grpc:9090"},
                 Identity("apps", "orders", "orders", "v2", {"http": 8080, "grpc": 9090}), id="everything given"),
    pytest.param({"mesh-namespace": "payments", "mesh-service-account": "checkout"}, {},
                 Identity("payments", "checkout", "vm-1", "latest", {}), id="exact SA pattern"),
])
def test_allowed(labels, metadata, expected):
    assert decide_identity(vm(labels, metadata), SETTINGS) == expected


@pytest.mark.parametrize("labels, metadata, sa, words", [
    pytest.param({"mesh-namespace": "istio-system"}, {}, "x@y", "reserved", id="istio-system"),
    pytest.param({"mesh-namespace": "kube-system"}, {}, "x@y", "reserved", id="kube-system"),
    pytest.param({"mesh-namespace": "other"}, {}, "x@y", "not in MESHJOIN_ALLOWED_NAMESPACES", id="not allowed ns"),
    pytest.param({"mesh-namespace": "payments", "mesh-service-account": "admin"}, {}, "x@y",
                 "payments/admin", id="SA outside allowlist"),
    pytest.param({"mesh-namespace": "bad_name"}, {}, "x@y", "not a valid Kubernetes name", id="underscore ns"),
    pytest.param({"mesh-app": "9lives"}, {}, "x@y", "app", id="app must start with a letter"),
    pytest.param({}, {"mesh-ports": "http:70000"}, "x@y", "outside 1-65535", id="port too big"),
    pytest.param({}, {"mesh-ports": "http:0"}, "x@y", "outside 1-65535", id="port zero"),
    pytest.param({}, {"mesh-ports": "http"}, "x@y", "not name:port", id="port without number"),
    pytest.param({}, {"mesh-ports": "a:1,a:2"}, "x@y", "repeats", id="duplicate port name"),
    pytest.param({}, {"mesh-ports": "a:1,b:1"}, "x@y", "repeats", id="duplicate port number"),
    pytest.param({}, {"mesh-ports": "http:80\nEVIL=1"}, "x@y", "not name:port", id="newline in ports"),
    pytest.param({}, {}, None, "no service account", id="VM without service account"),
])
def test_denied(labels, metadata, sa, words):
    decision = decide_identity(vm(labels, metadata, sa), SETTINGS)
    assert isinstance(decision, Denial)
    assert words in decision.reason


def test_protected_namespace_only_by_explicit_entry():
    star = Settings(project="p-roject", cluster=SETTINGS.cluster, allowed_namespaces=("*",))
    assert isinstance(decide_identity(vm({"mesh-namespace": "istio-system"}), star), Denial)
    assert isinstance(decide_identity(vm({"mesh-namespace": "anything"}), star), Identity)
    explicit = Settings(project="p-roject", cluster=SETTINGS.cluster, allowed_namespaces=("istio-system",))
    assert decide_identity(vm({"mesh-namespace": "istio-system"}), explicit).namespace == "istio-system"


def test_too_many_ports():
    raw = ",".join(f"p{i}:{1000 + i}" for i in range(33))
    assert isinstance(parse_ports(raw), Denial)
    assert len(parse_ports(",".join(f"p{i}:{1000 + i}" for i in range(32)))) == 32
