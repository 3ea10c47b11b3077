"""Identity policy: what a VM's service account is bound to, and what its labels may choose. Table-driven."""

from __future__ import annotations

import pytest

from meshjoin.model import MAX_REASON, Denial, Identity, Vm, VmKey
from meshjoin.policy import decide_identity, parse_ports
from meshjoin.settings import IdentityBinding, Settings

ORDERS = "orders@my-project.iam.gserviceaccount.com"
SHARED = "shared@other-project.iam.gserviceaccount.com"
DEFAULT_COMPUTE = "123456789012-compute@developer.gserviceaccount.com"
SETTINGS = Settings(
    project="my-project", cluster="projects/my-project/locations/us-central1/clusters/mesh",
    identity_bindings=(
        IdentityBinding(ORDERS, "apps", "orders", ("orders",)),
        IdentityBinding(SHARED, "apps", "cart", ("cart", "cart-admin")),
        IdentityBinding(SHARED, "payments", "checkout", ("checkout",)),
    ),
)


def vm(labels=None, metadata=None, sa=ORDERS) -> Vm:
    return Vm(key=VmKey("my-project", "us-central1-a", "vm-1"), instance_id="1",
              labels={"mesh": "join", **(labels or {})}, metadata=metadata or {}, metadata_fingerprint="f",
              network_ip="10.0.0.2", service_account=sa)


@pytest.mark.parametrize("labels, metadata, sa, expected", [
    pytest.param({}, {}, ORDERS, Identity("apps", "orders", "orders", "latest", {}), id="the one binding, no labels"),
    pytest.param({"mesh-namespace": "apps", "mesh-service-account": "orders", "mesh-app": "orders",
                  "mesh-version": "v2"}, {"mesh-ports": "http:8080, grpc:9090"}, ORDERS,
                 Identity("apps", "orders", "orders", "v2", {"http": 8080, "grpc": 9090}), id="labels repeat the binding"),
    pytest.param({"mesh-namespace": "payments"}, {}, SHARED, Identity("payments", "checkout", "checkout", "latest", {}),
                 id="a label chooses among two bindings"),
    pytest.param({"mesh-service-account": "cart", "mesh-app": "cart-admin"}, {}, SHARED,
                 Identity("apps", "cart", "cart-admin", "latest", {}), id="second app of a binding"),
])
def test_allowed(labels, metadata, sa, expected):
    assert decide_identity(vm(labels, metadata, sa), SETTINGS) == expected


@pytest.mark.parametrize("labels, metadata, sa, words", [
    pytest.param({"mesh-namespace": "apps", "mesh-service-account": "orders"}, {},
                 "stranger@my-project.iam.gserviceaccount.com", "bound to no mesh identity", id="unbound account"),
    pytest.param({"mesh-namespace": "apps", "mesh-service-account": "orders"}, {}, DEFAULT_COMPUTE,
                 "default compute service account", id="default compute account"),
    pytest.param({"mesh-service-account": "payments-admin"}, {}, ORDERS, "not bound to */payments-admin",
                 id="bound account asks for another KSA"),
    pytest.param({"mesh-namespace": "payments"}, {}, ORDERS, "not bound to payments/*", id="another namespace"),
    pytest.param({"mesh-namespace": "istio-system"}, {}, ORDERS, "not bound", id="istio-system"),
    pytest.param({"mesh-namespace": "kube-system"}, {}, ORDERS, "not bound", id="kube-system"),
    pytest.param({"mesh-app": "payments"}, {}, ORDERS, "not among the apps", id="take over another app"),
    pytest.param({}, {}, SHARED, "several identities", id="ambiguous without labels"),
    pytest.param({"mesh-namespace": "bad_name"}, {}, ORDERS, "not a valid Kubernetes name", id="underscore ns"),
    pytest.param({"mesh-app": "9lives"}, {}, ORDERS, "app", id="app must start with a letter"),
    pytest.param({}, {"mesh-ports": "http:70000"}, ORDERS, "outside 1-65535", id="port too big"),
    pytest.param({}, {"mesh-ports": "http:0"}, ORDERS, "outside 1-65535", id="port zero"),
    pytest.param({}, {"mesh-ports": "http"}, ORDERS, "not name:port", id="port without number"),
    pytest.param({}, {"mesh-ports": "a:1,a:2"}, ORDERS, "repeats", id="duplicate port name"),
    pytest.param({}, {"mesh-ports": "a:1,b:1"}, ORDERS, "repeats", id="duplicate port number"),
    pytest.param({}, {"mesh-ports": "http:80\nEVIL=1"}, ORDERS, "not name:port", id="newline in ports"),
    pytest.param({}, {"mesh-ports": "http\n:8080"}, ORDERS, "not name:port", id="newline ending a port name"),
    pytest.param({}, {"mesh-ports": "http:²"}, ORDERS, "not name:port", id="superscript digit"),
    pytest.param({}, {"mesh-ports": "http:８０"}, ORDERS, "not name:port", id="fullwidth digits"),
    pytest.param({}, {}, None, "no service account", id="VM without service account"),
])
def test_denied(labels, metadata, sa, words):
    decision = decide_identity(vm(labels, metadata, sa), SETTINGS)
    assert isinstance(decision, Denial)
    assert words in decision.reason


def test_only_an_unbound_account_is_denied_without_writing_to_the_vm():
    """meshjoin may act only as bound accounts: a status write to any other VM would get 403."""
    assert decide_identity(vm(sa="stranger@p-roject.iam.gserviceaccount.com"), SETTINGS).account_bound is False
    assert decide_identity(vm(sa=DEFAULT_COMPUTE), SETTINGS).account_bound is False
    assert decide_identity(vm({"mesh-app": "payments"}), SETTINGS).account_bound is True
    assert decide_identity(vm(sa=None), SETTINGS).account_bound is True  # no account: no actAs needed


def test_the_default_compute_account_joins_only_if_bound_on_purpose():
    bound = Settings(project="my-project", cluster=SETTINGS.cluster,
                     identity_bindings=(IdentityBinding(DEFAULT_COMPUTE, "apps", "legacy", ("legacy",)),))
    assert decide_identity(vm(sa=DEFAULT_COMPUTE), bound) == Identity("apps", "legacy", "legacy", "latest", {})


def test_no_binding_means_nobody_joins():
    empty = Settings(project="my-project", cluster=SETTINGS.cluster)
    assert isinstance(decide_identity(vm(), empty), Denial)


def test_a_denial_reason_is_bounded_whatever_the_input():
    many = Settings(project="my-project", cluster=SETTINGS.cluster, identity_bindings=tuple(
        IdentityBinding(ORDERS, f"ns-{i}", "x" * 60, ("a" * 60,)) for i in range(50)))
    short = decide_identity(vm({"mesh-service-account": "nobody"}), Settings(
        project="my-project", cluster=SETTINGS.cluster, identity_bindings=tuple(
            IdentityBinding(ORDERS, f"n{i}", "k", ("a",)) for i in range(7)))).reason
    assert "n4/k and 2 more" in short and "n5/k" not in short
    reason = decide_identity(vm({"mesh-service-account": "nobody"}), many).reason
    assert len(reason) == MAX_REASON and reason.endswith("...")  # five listed, then cut
    assert len(Denial("x" * 10_000).reason) == MAX_REASON


def test_too_many_ports():
    raw = ",".join(f"p{i}:{1000 + i}" for i in range(33))
    assert isinstance(parse_ports(raw), Denial)
    assert len(parse_ports(",".join(f"p{i}:{1000 + i}" for i in range(32)))) == 32
