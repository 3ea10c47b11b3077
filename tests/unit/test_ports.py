"""The ports: each adapter and the in-memory fake beside it answer the same Protocol, method by method.

The core (reconcile, sweep, fleet, cli, ...) is written against `Compute`, `Secrets`, `Kube` and `Publisher`;
unit tests run it on the fakes, production on the adapters. A fake whose signature drifts from the adapter's
would let a unit test pass a call production refuses (or the reverse): every method of a Protocol must have
the same signature, parameter by parameter (name, kind, default, annotation) and return annotation, in the
Protocol, the adapter and the fake. And a Protocol holds exactly what the core calls: no more, no less.
No I/O: signatures and source only.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import meshjoin
from meshjoin.adapters.compute import Compute, ComputeAdapter
from meshjoin.adapters.compute_fake import FakeCompute
from meshjoin.adapters.fake_pubsub import InMemoryPublisher
from meshjoin.adapters.kube import Kube, KubeAdapter
from meshjoin.adapters.kube_fake import FakeKube
from meshjoin.adapters.pubsub import Publisher, PubSubPublisher
from meshjoin.adapters.secrets import Secrets, SecretsAdapter
from meshjoin.adapters.secrets_fake import FakeSecrets

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
