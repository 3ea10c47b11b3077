"""The ports: each adapter and the in-memory fake beside it answer the same Protocol, method by method.

The core (reconcile, sweep, fleet, cli, ...) is written against `Compute`, `Secrets`, `Kube` and `Publisher`;
unit tests run it on the fakes, production on the adapters. A fake whose signature drifts from the adapter's
would let a unit test pass a call production refuses (or the reverse): every method of a Protocol must have
the same signature, parameter by parameter (name, kind, default, annotation) and return annotation, in the
Protocol, the adapter and the fake. And a Protocol holds exactly what the core calls: no more, no less.
Then the rules of the real services that the fakes keep (412, slim listings, owned-only writes, selectors,
paging). No I/O: signatures, source and the fakes only.
"""

from __future__ import annotations

import ast
import inspect
from datetime import datetime, timezone
from pathlib import Path

import pytest

import meshjoin
from meshjoin import names
from meshjoin.adapters.compute import Compute, ComputeAdapter
from meshjoin.adapters.compute_fake import FakeCompute
from meshjoin.adapters.fake_pubsub import InMemoryPublisher
from meshjoin.adapters.kube import Kube, KubeAdapter
from meshjoin.adapters.kube_fake import FakeKube
from meshjoin.adapters.pubsub import Publisher, PubSubPublisher
from meshjoin.adapters.secrets import Secrets, SecretsAdapter
from meshjoin.adapters.secrets_fake import FakeSecrets
from meshjoin.errors import CaMaterialError, ConflictError, PermanentError, StaleFingerprint, TransientError
from meshjoin.model import Identity, Vm, VmKey
from meshjoin.registration import workload_entry

# (the Protocol, the attribute name the core reaches the port by, the real adapter, the fake)
PORTS = [
    (Compute, "compute", ComputeAdapter, FakeCompute),
    (Secrets, "secrets", SecretsAdapter, FakeSecrets),
    (Kube, "kube", KubeAdapter, FakeKube),
    (Publisher, "publisher", PubSubPublisher, InMemoryPublisher),
]
PACKAGE = Path(meshjoin.__file__).parent


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(protocol).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def drift(protocol: type, implementation: type) -> list[str]:
    """Every way `implementation` differs from `protocol`: a missing method, or a different signature."""
    problems = []
    for name, wanted in protocol_methods(protocol).items():
        member = inspect.getattr_static(implementation, name, None)
        if not inspect.isfunction(member):
            problems.append(f"{implementation.__name__}.{name}: missing (or not a plain method)")
            continue
        actual = inspect.signature(member)
        if actual != wanted:
            problems.append(f"{implementation.__name__}.{name}{actual} is not {protocol.__name__}.{name}{wanted}")
    return problems


@pytest.mark.parametrize("protocol, _, implementation", [(p, n, i) for p, n, real, fake in PORTS for i in (real, fake)],
                         ids=[f"{p.__name__}-{i.__name__}" for p, n, real, fake in PORTS for i in (real, fake)])
def test_the_adapter_and_its_fake_answer_the_protocol_method_by_method(protocol, _, implementation):
    assert protocol_methods(protocol), f"{protocol.__name__} declares no method"
    assert drift(protocol, implementation) == []


def test_a_drifted_fake_is_caught():
    """The check above can fail: a fake that renamed a parameter, made it positional, changed a default or
    lost a method is each reported."""

    class Drifted(FakeCompute):
        def get_vm(self, vm_key):  # renamed parameter, no annotations
            return None

        def list_vms(self, label_filter: str, project: str | None = None, *, unreachable: set[str] | None = None,
                     page_size: int = 500, metadata_keys: frozenset[str] | None = None):
            return iter(())

    class Incomplete:
        def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    problems = drift(Compute, Drifted)
    assert [p.split("(")[0] for p in problems] == ["Drifted.get_vm", "Drifted.list_vms"]
    assert [p.split(":")[0] for p in drift(Kube, Incomplete)] == [
        "Incomplete.list", "Incomplete.create_if_missing", "Incomplete.apply_owned", "Incomplete.delete_owned"]


def calls_on_ports(source: str) -> dict[str, set[str]]:
    """Methods called on `<anything>.compute`, `compute`, `self.kube`, ... in a module's source."""
    receivers = {name for _, name, _, _ in PORTS}
    called: dict[str, set[str]] = {name: set() for name in receivers}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = node.func.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else \
            receiver.id if isinstance(receiver, ast.Name) else None
        if name in receivers:
            called[name].add(node.func.attr)
    return called


def test_each_protocol_holds_exactly_what_the_core_calls():
    """The core's modules (everything but the adapters) call on each port exactly the Protocol's methods."""
    called: dict[str, set[str]] = {name: set() for _, name, _, _ in PORTS}
    modules = [p for p in PACKAGE.rglob("*.py") if "adapters" not in p.relative_to(PACKAGE).parts]
    assert len(modules) > 5
    for module in modules:
        for port, methods in calls_on_ports(module.read_text()).items():
            called[port] |= methods
    for protocol, port, _, _ in PORTS:
        assert called[port] == set(protocol_methods(protocol)), protocol.__name__


def test_the_call_scan_sees_calls_through_any_receiver():
    """The scan behind the check above finds calls through `self.`, `r.`, chained and bare receivers."""
    source = ("self.compute.get_vm(k)\nr.kube.list('A', s)\nself.reconciler.compute.list_vms(f)\n"
              "secrets.plugin_ca()\nself.publisher.publish([])\nother.get_vm(k)\n")
    assert calls_on_ports(source) == {"compute": {"get_vm", "list_vms"}, "kube": {"list"},
                                      "secrets": {"plugin_ca"}, "publisher": {"publish"}}


# --- the fakes keep the rules the core relies on ----------------------------------------------------------

KEY = VmKey("p", "us-central1-a", "vm-1")


def vm(key: VmKey = KEY, labels=None, metadata=None) -> Vm:
    return Vm(key, "42", {"mesh": "join"} if labels is None else labels,
              {names.STATUS_KEY: "{}", "other": "x"} if metadata is None else metadata, "fp-0", "10.0.0.2", "a@p")


def test_fake_compute_refuses_a_stale_fingerprint_and_a_listings_slim_view():
    compute = FakeCompute({KEY: vm()})
    read = compute.get_vm(KEY)
    compute.set_metadata(read, {"a": "1"})
    assert compute.get_vm(KEY).metadata == {names.STATUS_KEY: "{}", "other": "x", "a": "1"}  # others' items kept
    with pytest.raises(StaleFingerprint):
        compute.set_metadata(read, {"a": "2"})  # written since it was read: 412
    reread = compute.get_vm(KEY)
    compute.owner_writes(KEY, {"owner": "1"})
    with pytest.raises(StaleFingerprint):
        compute.set_metadata(reread, {"a": "2"})  # the owner wrote since
    assert compute.get_vm(KEY).metadata["a"] == "1" and compute.get_vm(KEY).metadata["owner"] == "1"
    (listed,) = compute.list_vms("labels.mesh=join")
    assert not listed.metadata_complete and listed.metadata == {names.STATUS_KEY: "{}"}
    with pytest.raises(ValueError, match="partial view"):
        compute.set_metadata(listed, {"a": "3"})


def test_fake_compute_lists_by_filter_in_pages_and_names_unreachable_zones():
    vms = {k: vm(k) for k in (VmKey("p", z, f"vm-{i}") for z in ("a", "b") for i in range(3))}
    vms[VmKey("p", "a", "off")] = vm(VmKey("p", "a", "off"), labels={"mesh": "no"})
    vms[VmKey("q", "a", "vm-0")] = vm(VmKey("q", "a", "vm-0"))
    compute = FakeCompute(vms, unreachable_zones=frozenset({"b"}))
    unreachable: set[str] = set()
    listed = list(compute.list_vms("labels.mesh=join", project="p", unreachable=unreachable, page_size=2))
    assert [v.key.instance for v in listed] == ["vm-0", "vm-1", "vm-2"] and unreachable == {"b"}
    assert compute.pages == 2
    assert [v.key.project for v in compute.find("vm-0")] == ["p", "q"]
    assert [v.metadata_complete for v in compute.find("vm-0", project="q")] == [True]
    with pytest.raises(ValueError, match="filter"):
        list(compute.list_vms("labels.mesh:join"))


def entry(instance: str, namespace: str = "apps", owned: bool = True) -> dict:
    obj = workload_entry(vm(VmKey("p", "a", instance)), Identity(namespace, "sa", "web", "v1"), "",
                         datetime(2026, 1, 1, tzinfo=timezone.utc))
    if not owned:
        obj["metadata"]["labels"].pop(names.MANAGED_BY_LABEL)
    return obj


def test_fake_kube_writes_only_what_meshjoin_owns_with_the_apis_preconditions():
    mine, foreign = entry("vm-1"), entry("vm-2", owned=False)
    kube = FakeKube([mine, foreign])
    key = lambda obj: ("WorkloadEntry", obj["metadata"]["namespace"], obj["metadata"]["name"])  # noqa: E731
    with pytest.raises(ConflictError):
        kube.apply_owned(foreign, None)  # exists, not meshjoin's
    assert kube.delete_owned(*key(foreign)) is False and key(foreign) in kube.objects
    read = kube.get(*key(mine))
    read["spec"]["address"] = "mutated"  # a copy: the store is not touched
    assert kube.get(*key(mine))["spec"]["address"] != "mutated"
    replaced = kube.apply_owned(mine, kube.get(*key(mine)))
    assert replaced["metadata"]["uid"] == read["metadata"]["uid"]  # a replace keeps the object's uid
    assert replaced["metadata"]["resourceVersion"] != read["metadata"]["resourceVersion"]
    with pytest.raises(TransientError):
        kube.apply_owned(mine, read)  # written since `read`: 409
    assert kube.delete_owned(*key(mine), expected=replaced) is True
    with pytest.raises(PermanentError):
        kube.apply_owned(mine, replaced)  # deleted since: a PUT does not create
    recreated = kube.create_if_missing(mine)
    assert kube.delete_owned(*key(mine), expected=replaced) is False  # another object of that name now
    assert kube.get(*key(mine))["metadata"]["uid"] == recreated["metadata"]["uid"]


def test_fake_kube_selects_by_labels_in_pages():
    kube = FakeKube([entry(f"vm-{i}") for i in range(5)] + [entry("vm-9", owned=False), entry("vm-8", "other")])
    owned = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"
    assert len(list(kube.list("WorkloadEntry", owned, page_size=2))) == 6 and kube.list_pages == 3
    assert len(list(kube.list("WorkloadEntry", owned, namespace="apps"))) == 5
    assert [o["metadata"]["name"] for o in kube.list("WorkloadEntry", f"{owned},{names.VM_LABEL}=vm-3")] == \
        [entry("vm-3")["metadata"]["name"]]
    assert len(list(kube.list("WorkloadEntry", f"!{names.MANAGED_BY_LABEL}"))) == 1
    assert len(list(kube.list("WorkloadEntry", f"{names.VM_LABEL}!=vm-3"))) == 6
    with pytest.raises(ValueError, match="selector"):
        list(kube.list("WorkloadEntry", "app in (web)"))


def test_fake_secrets_has_no_ca_until_its_secrets_have_versions_and_deletes_once():
    secrets = FakeSecrets(None, legacy=[KEY])
    with pytest.raises(CaMaterialError):
        secrets.plugin_ca()
    assert [k for k, _ in secrets.list_vm_secrets()] == [KEY]
    assert secrets.delete_vm_secret(KEY) is True and secrets.delete_vm_secret(KEY) is False  # 404: none left
