"""A hostile VM owner, one named test per attack of issue 15 (in-memory fakes of the three APIs).

The attacker controls their VM's labels, metadata (including a forged `meshjoin-status`) and, as a
tenant of the cluster, objects in their own namespace. Each test repeats its attack ATTEMPTS times with
variations and checks that everything outside the attacker's VM is byte-for-byte unchanged: other
VMs' metadata, every Kubernetes object meshjoin did not make for the attacker, every other secret and
its reader. The counts are recorded (printed; written to MESHJOIN_TENANT_REPORT if set) and quoted in
RELIABILITY.md, "Hostile tenants".

Bounded in `make test`; `make faults` (MESHJOIN_FAULTS=full) runs ten times as many attempts. The
agent's symlink attack needs a real shell and lives in tests/e2e/test_vm_agent.py.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from meshjoin import names, registration
from meshjoin.status import Status
from meshjoin.errors import ApiPermissionError
from meshjoin.model import Identity, Vm, VmKey
from meshjoin.reconcile import Reconciler
from meshjoin.settings import IdentityBinding, Settings
from meshjoin.sweep import Sweeper, plan_sweep

from .test_hostile_input import FakeCompute, FakeKube, FakeSecrets, plugin_ca  # noqa: F401 - a fixture

pytestmark = pytest.mark.faults

FULL = os.environ.get("MESHJOIN_FAULTS") == "full"
ATTEMPTS = 200 if FULL else 20
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
PROJECT = "my-project"
ZONE = "us-central1-a"
ORDERS = f"orders@{PROJECT}.iam.gserviceaccount.com"
ATTACKER = f"tenant@{PROJECT}.iam.gserviceaccount.com"
STRANGER = f"stranger@{PROJECT}.iam.gserviceaccount.com"
DEFAULT_COMPUTE = "123456789012-compute@developer.gserviceaccount.com"
SETTINGS = Settings(
    project=PROJECT, cluster=f"projects/{PROJECT}/locations/us-central1/clusters/mesh",
    identity_bindings=(IdentityBinding(ORDERS, "apps", "orders", ("orders",)),
                       IdentityBinding(ATTACKER, "tenant", "web", ("web",))))
FIGURES: dict[str, dict] = {}


def record(attack: str, attempts: int, effect_outside: int) -> None:
    FIGURES[attack] = {"attempts": attempts, "effect_outside_attacker_vm": effect_outside}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("MESHJOIN_TENANT_REPORT")
    summary = {"size": "full" if FULL else "bounded", "figures": FIGURES}
    if path:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")
    print("\nhostile tenant figures:", json.dumps(summary))


# --- fakes that enforce what Google enforces for these attacks ---------------------------------------


class TenantCompute(FakeCompute):
    """Compute that lists by label and, like GCE, lets a caller write the metadata of a VM that runs as a
    service account only if the caller may act as that account (the functions: the bound ones)."""

    def __init__(self, vms, acts_as: set[str]):
        super().__init__(vms)
        self.acts_as = acts_as

    def list_vms(self, label_filter, page_size=500, unreachable=None, *, project=None):
        return [vm for vm in self.vms.values() if vm.wants_mesh and project in (None, vm.key.project)]

    def set_metadata(self, vm, items, remove=frozenset()):
        account = self.vms[vm.key].service_account
        if account and account not in self.acts_as:
            raise ApiPermissionError(f"compute.instances.setMetadata on {vm.key}: 403, iam.serviceAccounts.actAs "
                                     f"on {account} is required")
        super().set_metadata(vm, items, remove)
        current = self.vms[vm.key]
        self.vms[vm.key] = Vm(current.key, current.instance_id, current.labels, current.metadata,
                              current.metadata_fingerprint, current.network_ip, current.service_account, vm.status)


class World:
    def __init__(self, ca, vms=(), objects=(), settings: Settings = SETTINGS):
        self.compute = TenantCompute({vm.key: vm for vm in vms}, acts_as={b.gsa for b in settings.identity_bindings})
        self.secrets = FakeSecrets(ca)
        self.kube = FakeKube(list(objects))
        self.reconciler = Reconciler(settings, self.compute, self.secrets, self.kube, clock=lambda: NOW)
        self.sweeper = Sweeper(settings, self.reconciler, clock=lambda: NOW)

    def outside(self, attacker: VmKey) -> str:
        """Everything that is not the attacker VM's own: what an attack must leave unchanged."""
        vms = {str(k): dict(v.metadata) for k, v in self.compute.vms.items() if k != attacker}
        objects = {str(k): o for k, o in self.kube.objects.items()
                   if (o["metadata"].get("annotations") or {}).get(names.ANNOTATION_PREFIX + "instance")
                   != attacker.instance}
        secrets = sorted(str(k) for k in self.secrets.legacy if k != attacker)
        return json.dumps([vms, objects, secrets], sort_keys=True, default=str)


def vm(name: str, account: str | None, labels: dict | None = None, metadata: dict | None = None, *,
       address: str = "10.128.0.7", status: str = "RUNNING") -> Vm:
    return Vm(VmKey(PROJECT, ZONE, name), f"id-{name}", {"mesh": "join", **(labels or {})}, dict(metadata or {}),
              "fp-0", address, account, status)


def foreign_app(namespace: str, app: str) -> list[dict]:
    """An app deployed in the cluster by someone else: its Service and a pod it selects."""
    return [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": app, "namespace": namespace, "labels": {"app": app}},
             "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80}]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{app}-7d9f", "namespace": namespace,
                                                             "labels": {"app": app}}, "spec": {}}]


def join(world: World, key: VmKey):
    """Join a VM as in production: meshjoin bootstraps it (`waiting`, no entry), the VM's agent makes its key
    and hands in a CSR, meshjoin certifies it (still `waiting`), the agent reports the certificate through
    guest attributes, and the next pass registers it."""
    assert world.reconciler.reconcile(key).state == "waiting"
    world.compute.hand_in_key(key)
    assert world.reconciler.reconcile(key).verb == "delivered"
    world.compute.confirm(key)
    outcome = world.reconciler.reconcile(key)
    assert outcome.state == "joined", outcome
    return outcome


def entries_with_app(world: World, app: str) -> list[dict]:
    return [o for o in world.kube.objects.values()
            if o["kind"] == "WorkloadEntry" and (o["metadata"].get("labels") or {}).get("app") == app]


# --- 1. take over an existing app --------------------------------------------------------------------

TAKEOVER_LABELS = [
    {"mesh-app": "payments", "mesh-service-account": "payments"},
    {"mesh-app": "payments", "mesh-service-account": "payments", "mesh-namespace": "payments"},
    {"mesh-app": "payments"},
    {"mesh-namespace": "payments", "mesh-service-account": "payments"},
    {"mesh-namespace": "apps", "mesh-service-account": "orders", "mesh-app": "orders"},  # another account's identity
]


def test_attack_take_over_an_existing_app(plugin_ca):
    changed = 0
    for attempt in range(ATTEMPTS):
        labels = TAKEOVER_LABELS[attempt % len(TAKEOVER_LABELS)]
        account = (ATTACKER, STRANGER, DEFAULT_COMPUTE)[attempt % 3]
        attacker = vm(f"evil-{attempt}", account, labels, {"mesh-ports": "http:80"})
        world = World(plugin_ca, [attacker], foreign_app("payments", "payments"))
        before = world.outside(attacker.key)

        outcome = world.reconciler.reconcile(attacker.key)

        assert outcome.verb == "denied", (labels, account, outcome)
        assert entries_with_app(world, "payments") == [] and world.secrets.calls == []
        changed += world.outside(attacker.key) != before
    record("take over an existing app (its SPIFFE identity, its Service)", ATTEMPTS, changed)
    assert changed == 0


def test_a_bound_app_may_join_a_service_meshjoin_did_not_create_on_purpose(plugin_ca):
    """Mesh expansion stays possible: the binding names the app, so the VM becomes its endpoint."""
    settings = Settings(project=PROJECT, cluster=SETTINGS.cluster,
                        identity_bindings=(IdentityBinding(ORDERS, "payments", "payments", ("payments",)),))
    world = World(plugin_ca, [vm("pay-vm", ORDERS, {}, {"mesh-ports": "http:8080"})], foreign_app("payments", "payments"),
                  settings)
    service_before = json.dumps(world.kube.objects[("Service", "payments", "payments")], sort_keys=True)
    join(world, VmKey(PROJECT, ZONE, "pay-vm"))
    assert len(entries_with_app(world, "payments")) == 1
    # The Service is someone else's: selected into, never rewritten for the VM's ports.
    assert json.dumps(world.kube.objects[("Service", "payments", "payments")], sort_keys=True) == service_before


# --- 2. shared and default service accounts -----------------------------------------------------------


def test_attack_default_or_unbound_account_gets_nothing_written(plugin_ca):
    changed = 0
    for attempt in range(ATTEMPTS):
        account = DEFAULT_COMPUTE if attempt % 2 else STRANGER
        attacker = vm(f"shared-{attempt}", account, {"mesh-namespace": "apps", "mesh-service-account": "orders"},
                      {"mesh-ports": "http:8080"})
        victim = vm("orders-1", ORDERS)
        world = World(plugin_ca, [attacker, victim])
        world.reconciler.reconcile(victim.key)
        before = world.outside(attacker.key)

        outcome = world.reconciler.reconcile(attacker.key)

        assert outcome.verb == "denied" and account in outcome.reason and ("bound" in outcome.reason or "bind" in outcome.reason)
        # Denied BEFORE anything is written: no key, no entry, and not even a status (actAs).
        assert world.compute.vms[attacker.key].metadata == {"mesh-ports": "http:8080"} and world.compute.writes == 1
        assert world.secrets.calls == []
        assert not [o for o in world.kube.objects.values()
                    if (o["metadata"].get("labels") or {}).get(names.VM_LABEL) == attacker.key.instance]
        changed += world.outside(attacker.key) != before
    record("default compute or unbound service account", ATTEMPTS, changed)
    assert changed == 0


def test_an_account_unbound_after_joining_loses_its_entry_and_gets_no_more_certificates(plugin_ca):
    was_bound = vm("orders-1", ORDERS)
    world = World(plugin_ca, [was_bound])
    join(world, was_bound.key)
    assert list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) != []
    world.reconciler.settings = Settings(project=PROJECT, cluster=SETTINGS.cluster)  # the operator unbinds
    writes = world.compute.writes
    world.compute.hand_in_key(was_bound.key)  # asking for a certificate for a new key changes nothing
    outcome = world.reconciler.reconcile(was_bound.key)
    assert outcome.verb == "denied" and list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) == []
    assert world.compute.writes == writes and world.secrets.calls == []  # no actAs: nothing written, nothing signed


def legacy_vm(name: str, account: str) -> Vm:
    """A VM meshjoin 2 joined: its key in a per-VM secret named by `meshjoin-secret`."""
    secret = f"projects/1/secrets/{names.secret_id(VmKey(PROJECT, ZONE, name), 'meshjoin-vm')}/versions/3"
    status = {"state": "joined", "identity": "spiffe://cluster.local/ns/apps/sa/orders", "instanceId": f"id-{name}",
              "confirmedSerial": "abc", "certSerial": "abc", "secret": secret, "workloadEntry": "apps/x",
              "certNotBefore": "2026-11-21T00:00:00Z", "certNotAfter": "2026-11-22T00:00:00Z"}
    return vm(name, account, {}, {names.SECRET_KEY: secret, names.STATUS_KEY: json.dumps(status)})


def test_an_account_unbound_while_its_vm_migrates_loses_its_legacy_secret_at_the_next_sweep(plugin_ca):
    """The sweep finds a legacy secret by its own listing and removes it, whatever the VM's metadata says."""
    migrating = legacy_vm("orders-1", ORDERS)
    world = World(plugin_ca, [migrating])
    world.secrets.legacy.add(migrating.key)
    unbound = Settings(project=PROJECT, cluster=SETTINGS.cluster)  # the operator unbinds
    world.reconciler.settings = world.sweeper.settings = unbound
    world.sweeper.sweep()
    assert world.secrets.legacy == set() and list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) == []


def test_a_forged_denied_status_does_not_keep_a_legacy_key_alive(plugin_ca):
    """The owner of a migrating VM strips meshjoin's items and forges `denied`: meshjoin's listings, not the
    VM's metadata, decide what is removed, and the sweep converges (nothing left to do afterwards)."""
    migrating = legacy_vm("tenant-1", ATTACKER)
    world = World(plugin_ca, [migrating])
    world.secrets.legacy.add(migrating.key)
    world.reconciler.settings = world.sweeper.settings = Settings(project=PROJECT, cluster=SETTINGS.cluster)
    current = world.compute.vms[migrating.key]
    world.compute.vms[migrating.key] = Vm(migrating.key, current.instance_id, current.labels,
                                          {names.STATUS_KEY: json.dumps({"state": "denied", "reason": "forged"})},
                                          "fp-x", current.network_ip, current.service_account)
    world.sweeper.sweep()
    assert world.secrets.legacy == set()
    assert world.secrets.calls.count(f"secrets.delete {migrating.key}") == 1
    assert world.sweeper.sweep(dry_run=True).plan.actions == []


# --- 3. cross-project takeover through a forged WorkloadEntry ----------------------------------------


def forged_entry(index: int, project: str, instance: str) -> dict:
    attacker_vm = Vm(VmKey(project, ZONE, instance), "666", {"mesh": "join"}, {}, "fp", f"192.0.2.{index % 250}",
                     ATTACKER)
    entry = registration.workload_entry(attacker_vm, Identity("tenant", "web", "web", "v1"), "", NOW)
    entry["metadata"]["name"] = f"forged-{index}"
    return entry


def test_attack_cross_project_forged_entry(plugin_ca):
    changed = 0
    for attempt in range(ATTEMPTS):
        victim = vm("orders-1", ORDERS)
        projects = ("attacker-project", "example.com:attacker", PROJECT, "x", "my-project\n")
        world = World(plugin_ca, [victim])
        join(world, victim.key)
        forged = forged_entry(attempt, projects[attempt % len(projects)], "orders-1" if attempt % 2 else "gone-vm")
        world.kube._store(forged)
        forged_ref = ("WorkloadEntry", "tenant", forged["metadata"]["name"])
        before = json.dumps([world.compute.vms[victim.key].metadata,
                             {str(k): o for k, o in world.kube.objects.items() if k != forged_ref},
                             sorted(map(str, world.secrets.legacy))], sort_keys=True, default=str)

        world.sweeper.sweep()

        after = json.dumps([world.compute.vms[victim.key].metadata,
                            {str(k): o for k, o in world.kube.objects.items() if k != forged_ref},
                            sorted(map(str, world.secrets.legacy))], sort_keys=True, default=str)
        assert not [c for c in world.secrets.calls if "delete" in c and "orders-1" not in c]
        changed += after != before
    record("cross-project takeover through a forged WorkloadEntry", ATTEMPTS, changed)
    assert changed == 0


def test_reconcile_never_acts_for_another_project(plugin_ca):
    world = World(plugin_ca, [vm("orders-1", ORDERS)])
    outcome = world.reconciler.reconcile(VmKey("attacker-project", ZONE, "orders-1"))
    assert outcome.verb == "ignored" and world.secrets.calls == [] and world.kube.objects == {}


def test_names_carry_the_project():
    a, b = VmKey("project-a", ZONE, "vm-1"), VmKey("project-b", ZONE, "vm-1")
    assert names.entry_name(a) != names.entry_name(b) and names.secret_id(a, "p") != names.secret_id(b, "p")
    scoped = VmKey("example.com:proj", ZONE, "x" * 63)
    assert len(names.entry_name(scoped)) <= 253 and ":" not in names.entry_name(scoped)
    assert len(names.secret_id(scoped, "meshjoin-vm")) <= 255 and ":" not in names.secret_id(scoped, "meshjoin-vm")


def test_secret_labels_naming_another_project_or_forged_ids_are_dropped():
    from meshjoin.adapters.secrets import SecretsAdapter

    adapter = object.__new__(SecretsAdapter)  # only the pure key check, no client
    adapter._settings = SETTINGS
    key = VmKey(PROJECT, ZONE, "vm-1")
    own = f"projects/1/secrets/{names.secret_id(key, SETTINGS.secret_prefix)}"
    labels = {"meshjoin-project": PROJECT, "meshjoin-zone": ZONE, "meshjoin-instance": "vm-1"}
    assert adapter.vm_key_of_secret(own, labels) == key
    assert adapter.vm_key_of_secret(own, {**labels, "meshjoin-project": "other-project"}) is None
    assert adapter.vm_key_of_secret(own, {k: v for k, v in labels.items() if k != "meshjoin-project"}) is None
    assert adapter.vm_key_of_secret("projects/1/secrets/istio-ca-key", labels) is None
    assert adapter.vm_key_of_secret(own, {**labels, "meshjoin-zone": "../x"}) is None


# --- 4. one VM stops every sweep ----------------------------------------------------------------------

HOSTILE_PORTS = ["http:²", "http\n:8080", "http:８０８０", "http:8\n080", ":", "http:" + "9" * 5000, "a:1," * 40,
                 "http:-1", "\x00:1"]


def test_attack_hostile_mesh_ports_cannot_stop_a_sweep(plugin_ca):
    changed = joined = 0
    for attempt in range(ATTEMPTS):
        ports = HOSTILE_PORTS[attempt % len(HOSTILE_PORTS)]
        attacker = vm("tenant-1", ATTACKER, {}, {"mesh-ports": ports})
        lost = vm("orders-1", ORDERS)  # labelled, but its event was lost: only the sweep can join it
        world = World(plugin_ca, [attacker, lost])
        bootstrapping = world.sweeper.sweep()  # the lost VM gets its bootstrap
        world.compute.hand_in_key(lost.key)  # its agent, once the bootstrap is there, makes its key

        delivering = world.sweeper.sweep()  # the lost VM's key is certified; it waits for its agent
        world.compute.confirm(lost.key)
        summary = world.sweeper.sweep()  # ... which has confirmed by the next sweep

        assert Status.decode(world.compute.vms[attacker.key].metadata[names.STATUS_KEY]).state == "denied"
        joined += Status.decode(world.compute.vms[lost.key].metadata.get(names.STATUS_KEY)).state == "joined"
        assert delivering.counts["waiting"] == 1 and delivering.counts["denied"] == 1
        assert summary.counts["joined"] == 1 and summary.counts["denied"] == 1
        changed += bootstrapping.counts["errors"] + delivering.counts["errors"] + summary.counts["errors"] != 0
    record("hostile mesh-ports (e.g. http:²) against the sweep", ATTEMPTS, changed)
    assert changed == 0 and joined == ATTEMPTS


def test_a_crash_one_vm_triggers_in_the_sweep_costs_only_that_vm(plugin_ca):
    """Whatever bug one VM's data triggers inside its reconcile, the other VMs of the sweep go on."""

    class Crashing(TenantCompute):
        def set_metadata(self, vm, items, remove=frozenset()):
            if vm.key.instance == "tenant-1":
                raise ValueError("invalid literal for int() with base 10: '²'")
            super().set_metadata(vm, items, remove)

    world = World(plugin_ca, [vm("tenant-1", ATTACKER), vm("orders-1", ORDERS)])
    world.compute.__class__ = Crashing
    bootstrapping = world.sweeper.sweep()  # orders-1 gets its bootstrap; its agent then hands in its key
    assert bootstrapping.counts["waiting"] == 1 and bootstrapping.counts["errors"] == 1
    world.compute.hand_in_key(VmKey(PROJECT, ZONE, "orders-1"))
    delivering = world.sweeper.sweep()
    assert delivering.counts["waiting"] == 1 and delivering.counts["errors"] == 1
    world.compute.confirm(VmKey(PROJECT, ZONE, "orders-1"))
    summary = world.sweeper.sweep()
    assert summary.counts["joined"] == 1 and summary.counts["errors"] == 1
    assert any("tenant-1" in e and "ValueError" in e for e in summary.errors)


def test_the_cli_names_the_vm_and_the_problem_instead_of_a_traceback(monkeypatch):
    from click.testing import CliRunner

    from meshjoin import cli

    class Broken:
        settings = SETTINGS

        class reconciler:
            @staticmethod
            def reconcile(key, **kwargs):
                raise ValueError("invalid literal for int() with base 10: '²'")

    monkeypatch.setattr(cli, "_runtime", lambda: Broken)
    logger = logging.getLogger("meshjoin")  # the CLI configures meshjoin's logger: put it back afterwards
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        result = CliRunner().invoke(cli.cli, ["join", "tenant-1", "--zone", ZONE])
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "tenant-1: unexpected ValueError: invalid literal" in result.output


# --- 6. stale state -----------------------------------------------------------------------------------


def test_port_and_address_changes_reach_the_entry_and_meshjoins_service(plugin_ca):
    world = World(plugin_ca, [vm("orders-1", ORDERS, {}, {"mesh-ports": "http:8080"})])
    key = VmKey(PROJECT, ZONE, "orders-1")
    join(world, key)
    current = world.compute.vms[key]
    world.compute.vms[key] = Vm(key, current.instance_id, current.labels,
                                {**current.metadata, "mesh-ports": "http:9090,grpc:9091"}, current.metadata_fingerprint,
                                "10.128.0.99", current.service_account)
    plan = plan_sweep(world.sweeper.inventory(), SETTINGS, plugin_ca.fingerprint, NOW)
    assert [(a.kind, a.reason) for a in plan.actions] == [("join", "its address or ports changed")]
    world.sweeper.sweep()
    (entry,) = list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1"))
    assert entry["spec"]["address"] == "10.128.0.99" and entry["spec"]["ports"] == {"http": 9090, "grpc": 9091}
    service = world.kube.get("Service", "apps", "orders")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [9090, 9091]


def test_a_stopped_vm_is_not_routed_nor_renewed_and_rejoins_when_started(plugin_ca):
    key = VmKey(PROJECT, ZONE, "orders-1")
    world = World(plugin_ca, [vm("orders-1", ORDERS, {}, {"mesh-ports": "http:8080"})])
    join(world, key)
    current = world.compute.vms[key]
    world.compute.vms[key] = Vm(key, current.instance_id, current.labels, current.metadata,
                                current.metadata_fingerprint, current.network_ip, current.service_account, "TERMINATED")
    outcome = world.reconciler.reconcile(key)
    assert outcome.verb == "stopped"
    # Its agent's last report (the serial it held before stopping) does not bring a stopped VM back.
    assert world.reconciler.reconcile(key).verb == "stopped"
    assert list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) == []
    assert world.kube.get("Service", "apps", "orders") is None  # nothing selects it any more
    assert plan_sweep(world.sweeper.inventory(), SETTINGS, plugin_ca.fingerprint, NOW).actions == []  # no renewal
    current = world.compute.vms[key]
    world.compute.vms[key] = Vm(key, current.instance_id, current.labels, current.metadata,
                                current.metadata_fingerprint, current.network_ip, current.service_account, "RUNNING")
    # Started again: a fresh certificate for the key it kept, routed once the agent confirms it (not on the old
    # report).
    assert world.reconciler.reconcile(key).verb == "delivered"
    assert list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) == []
    world.compute.confirm(key)
    assert world.reconciler.reconcile(key).state == "joined"
    assert len(list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1"))) == 1


def test_meshjoin_never_deletes_a_service_that_selects_pods(plugin_ca):
    key = VmKey(PROJECT, ZONE, "orders-1")
    world = World(plugin_ca, [vm("orders-1", ORDERS, {}, {"mesh-ports": "http:8080"})])
    join(world, key)
    assert names.owned(world.kube.get("Service", "apps", "orders")["metadata"])
    world.kube._store({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orders-abc", "namespace": "apps",
                                                                      "labels": {"app": "orders"}}})
    world.compute.vms.pop(key)
    world.reconciler.reconcile(key)  # the VM is gone: its entry goes, the Service stays for the pod
    assert list(world.kube.list("WorkloadEntry", f"{names.VM_LABEL}=orders-1")) == []
    assert world.kube.get("Service", "apps", "orders") is not None
    assert world.reconciler.prune_service("apps", "orders") is False


def test_a_crash_in_one_vms_reconcile_is_logged_with_the_vm_and_acked(monkeypatch, caplog):
    """The event function: one VM's poison data must not loop through redelivery into the dead-letter topic."""
    import base64
    from types import SimpleNamespace

    from meshjoin import entrypoints

    class Crashing:
        def reconcile(self, key, cleanup=False):
            raise ValueError("invalid literal for int() with base 10: '²'")

    monkeypatch.setattr(entrypoints, "runtime", lambda: SimpleNamespace(settings=SETTINGS, reconciler=Crashing()))
    monkeypatch.setattr(entrypoints, "utc_now", lambda: NOW)
    data = base64.b64encode(json.dumps({"project": PROJECT, "zone": ZONE, "instance": "tenant-1"}).encode()).decode()
    entrypoints.handle_vm_event(SimpleNamespace(data={"message": {"data": data, "messageId": "7",
                                                                  "publishTime": "2026-11-21T11:59:00Z"}}))
    (line,) = [r for r in caplog.records if "reconcile failed unexpectedly" in r.getMessage()]
    assert "ValueError" in line.getMessage() and line.fields["instance"] == "tenant-1"  # acked: no raise
