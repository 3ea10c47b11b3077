"""Several VM projects (issue 16): the setting, the event function's project check, the sweep's
per-project inventory and its per-project prune decisions. Pure, or through the unit fakes."""

from __future__ import annotations

import base64
import json
import logging
from types import SimpleNamespace

import pytest

from meshjoin import entrypoints
from meshjoin.errors import SettingsError, TransientError
from meshjoin.model import VmKey
from meshjoin.settings import IdentityBinding, Settings
from meshjoin.sweep import PRUNE, Inventory, Sweeper, entry_key, plan_sweep

from .test_hostile_input import NOW, FakeCompute, FakeKube, FakeSecrets, plugin_ca  # noqa: F401 - a fixture
from .test_sweep_plan import CA, entry, status, vm

HOST, SECOND, OUTSIDER = "my-project", "second-proj", "not-managed"
CLUSTER = f"projects/{HOST}/locations/r/clusters/c"
BIND = tuple(IdentityBinding(f"{n}@x", "default", "default", (n,)) for n in ("a", "b", "gone", "gone2"))
SETTINGS = Settings(project=HOST, cluster=CLUSTER, vm_projects=(SECOND,), identity_bindings=BIND)


def in_project(v, project: str):
    """vm() of test_sweep_plan, moved to another project."""
    return v.__class__(VmKey(project, v.key.zone, v.key.instance), *[getattr(v, f) for f in (
        "instance_id", "labels", "metadata", "metadata_fingerprint", "network_ip", "service_account", "status")])


# --- the setting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    pytest.param(None, (HOST,), id="unset: the host project alone"),
    pytest.param("", (HOST,), id="empty: the host project alone"),
    pytest.param("second-proj", (HOST, SECOND), id="host first, then the list"),
    pytest.param(" second-proj , third-proj ", (HOST, SECOND, "third-proj"), id="spaces around ids"),
    pytest.param("second-proj,my-project,second-proj", (HOST, SECOND), id="host and repeats deduplicated"),
    pytest.param("example.com:scoped-proj", (HOST, "example.com:scoped-proj"), id="domain-scoped id"),
])
def test_vm_projects_always_start_with_the_host_project(raw, expected):
    env = {"MESHJOIN_PROJECT": HOST, "MESHJOIN_CLUSTER": CLUSTER}
    if raw is not None:
        env["MESHJOIN_VM_PROJECTS"] = raw
    assert Settings.from_env(env).vm_projects == expected


@pytest.mark.parametrize("raw", ["Second-Proj", "short", "proj/../x", "a" * 31, "second-proj;rm", "9starts-digit"])
def test_a_bad_project_id_is_refused_at_start_naming_the_variable(raw):
    with pytest.raises(SettingsError, match=r"MESHJOIN_VM_PROJECTS=.*is not a project id"):
        Settings.from_env({"MESHJOIN_PROJECT": HOST, "MESHJOIN_CLUSTER": CLUSTER, "MESHJOIN_VM_PROJECTS": raw})


def test_settings_built_directly_also_put_the_host_first():
    assert Settings(project=HOST, cluster=CLUSTER).vm_projects == (HOST,)
    assert Settings(project=HOST, cluster=CLUSTER, vm_projects=(SECOND, HOST)).vm_projects == (HOST, SECOND)


# --- events ---------------------------------------------------------------------------------------

def push(project: str) -> SimpleNamespace:
    data = base64.b64encode(json.dumps({"project": project, "zone": "us-central1-a", "instance": "vm-1"}).encode())
    return SimpleNamespace(data={"message": {"data": data.decode(), "messageId": "1",
                                             "publishTime": NOW.isoformat()}})


@pytest.mark.parametrize("project, reconciled", [(HOST, True), (SECOND, True), (OUTSIDER, False)])
def test_the_event_function_reconciles_vms_of_every_vm_project_and_no_other(monkeypatch, caplog, project, reconciled):
    seen = []

    class Recorder:
        def reconcile(self, key, cleanup=False):
            seen.append(key)
            return SimpleNamespace(verb="unchanged", reason="", state="", details={})

    monkeypatch.setattr(entrypoints, "runtime", lambda: SimpleNamespace(settings=SETTINGS, reconciler=Recorder()))
    monkeypatch.setattr(entrypoints, "utc_now", lambda: NOW)
    with caplog.at_level(logging.INFO, logger="meshjoin"):
        entrypoints.handle_vm_event(push(project))
    assert seen == ([VmKey(project, "us-central1-a", "vm-1")] if reconciled else [])
    if not reconciled:
        assert "not among MESHJOIN_VM_PROJECTS" in caplog.text


def test_the_reconcile_itself_ignores_a_vm_outside_the_vm_projects(plugin_ca):
    from meshjoin.reconcile import Reconciler

    outsider = in_project(vm("a"), OUTSIDER)
    compute = FakeCompute({outsider.key: outsider})
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW)
    outcome = reconciler.reconcile(outsider.key)
    assert outcome.verb == "ignored" and compute.writes == 0


# --- WorkloadEntries: whose are they -------------------------------------------------------------

@pytest.mark.parametrize("project, kept", [(HOST, True), (SECOND, True), (OUTSIDER, False)])
def test_entry_key_accepts_the_vm_projects_only(project, kept):
    key = entry_key(entry("a", project=project), SETTINGS.vm_projects)
    assert (key == VmKey(project, "us-central1-a", "a")) if kept else key is None
    # One project id as a string still works (callers that know the project).
    assert entry_key(entry("a", project=project), HOST) == (VmKey(HOST, "us-central1-a", "a") if project == HOST else None)


# --- the plan: prune per project -----------------------------------------------------------------

def test_the_plan_prunes_orphans_of_every_listed_project_and_no_outsider():
    inv = Inventory({}, [entry("gone", project=HOST), entry("gone2", project=SECOND), entry("x", project=OUTSIDER)],
                    [], {})
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    assert sorted((a.kind, str(a.key)) for a in plan.actions) == [
        (PRUNE, f"{HOST}/us-central1-a/gone"), (PRUNE, f"{SECOND}/us-central1-a/gone2")]


def test_a_project_whose_listing_failed_is_neither_pruned_nor_rejoined_the_others_are():
    healthy_second = in_project(vm("b", status("b")), SECOND)
    inv = Inventory({}, [entry("gone", project=HOST), entry("b", project=SECOND)], [], {},
                    unlisted_projects={SECOND: "403 compute.instances.list"})
    plan = plan_sweep(inv, SETTINGS, CA, NOW)
    # SECOND's entry looks orphaned only because its listing failed: kept. HOST's orphan goes.
    assert [(a.kind, str(a.key)) for a in plan.actions] == [(PRUNE, f"{HOST}/us-central1-a/gone")]
    assert any("VM listing incomplete" in n and SECOND in n for n in plan.notes)
    assert inv.complete and not inv.seen(healthy_second.key) and inv.seen(VmKey(HOST, "us-central1-a", "gone"))
    assert inv.failures == [f"Compute instances in {SECOND}: 403 compute.instances.list"]


def test_vms_of_a_second_project_are_planned_like_the_hosts():
    second = in_project(vm("a"), SECOND)  # labelled, never handled: a missed join
    plan = plan_sweep(Inventory({second.key: second}, [], [], {}), SETTINGS, CA, NOW)
    assert [(a.kind, a.key) for a in plan.actions] == [("join", second.key)]


# --- the inventory: one listing per project ------------------------------------------------------

class ProjectCompute(FakeCompute):
    """Lists per project and records which projects were asked; `failing` projects answer an error."""

    def __init__(self, vms, failing=()):
        super().__init__(vms)
        self.failing = set(failing)
        self.listed: list[str | None] = []

    def list_vms(self, label_filter, page_size=500, unreachable=None, *, project=None):
        self.listed.append(project)
        if project in self.failing:
            def pages():
                yield from [v for v in self.vms.values() if v.key.project == project][:1]  # a page, then the failure
                raise TransientError(f"aggregatedList {project}: 503")
            return pages()
        return super().list_vms(label_filter, page_size=page_size, unreachable=unreachable, project=project)


def sweeper(compute, plugin_ca) -> Sweeper:
    from meshjoin.reconcile import Reconciler

    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW)
    return Sweeper(SETTINGS, reconciler, clock=lambda: NOW)


def test_the_inventory_lists_each_vm_project_once_and_merges(plugin_ca):
    host_vm, second_vm, outsider = vm("a"), in_project(vm("b"), SECOND), in_project(vm("a"), OUTSIDER)
    compute = ProjectCompute({v.key: v for v in (host_vm, second_vm, outsider)})
    inv = sweeper(compute, plugin_ca).inventory()
    assert compute.listed == [HOST, SECOND]
    assert set(inv.vms) == {host_vm.key, second_vm.key}  # the outsider's project is never listed
    assert inv.complete and not inv.unlisted_projects


def test_a_failed_project_listing_contributes_no_vm_and_is_recorded(plugin_ca):
    host_vm, second_vm = vm("a"), in_project(vm("b"), SECOND)
    compute = ProjectCompute({v.key: v for v in (host_vm, second_vm)}, failing={SECOND})
    inv = sweeper(compute, plugin_ca).inventory()
    assert set(inv.vms) == {host_vm.key}  # not even the page SECOND answered before failing
    assert list(inv.unlisted_projects) == [SECOND] and "503" in inv.unlisted_projects[SECOND]
    assert inv.complete  # the cluster listings answered: the host project may still be pruned


def test_a_sweep_goes_on_with_the_projects_that_answered(plugin_ca):
    host_vm, second_vm = vm("a"), in_project(vm("b"), SECOND)
    compute = ProjectCompute({v.key: v for v in (host_vm, second_vm)}, failing={SECOND})
    summary = sweeper(compute, plugin_ca).sweep(dry_run=True)
    assert [a.key for a in summary.plan.actions] == [host_vm.key]
    assert summary.errors == [f"Compute instances in {SECOND}: aggregatedList {SECOND}: 503"]


def test_a_sweep_with_no_project_listed_does_nothing(plugin_ca):
    compute = ProjectCompute({vm("a").key: vm("a")}, failing={HOST, SECOND})
    summary = sweeper(compute, plugin_ca).sweep(dry_run=True)
    assert summary.plan.actions == [] and summary.plan.notes == ["no VM listing: nothing to do this sweep"]
    assert len(summary.errors) == 2


# --- the operator's CLI ----------------------------------------------------------------------------

@pytest.fixture
def cli_runtime(monkeypatch, plugin_ca):
    """The CLI over the fakes: a VM named vm-1 in the host project and one named vm-2 in SECOND."""
    from click.testing import CliRunner

    from meshjoin import cli
    from meshjoin.reconcile import Outcome

    vms = [in_project(vm("a", status("a")), HOST), in_project(vm("b"), SECOND)]
    compute = ProjectCompute({v.key: v for v in vms})
    compute.find = lambda name, project=None: [v for v in vms if v.key.instance == name
                                               and project in (None, v.key.project)]
    rt = SimpleNamespace(settings=SETTINGS, compute=compute, sweeper=sweeper(compute, plugin_ca), asked=[])
    rt.reconciler = SimpleNamespace(reconcile=lambda key, **kw: rt.asked.append(key) or Outcome("unchanged", "ok"))
    monkeypatch.setattr(cli, "_runtime", lambda: rt)
    logger = logging.getLogger("meshjoin")  # the CLI configures meshjoin's logger: put it back afterwards
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield rt, lambda *args: CliRunner().invoke(cli.cli, list(args))
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_the_cli_finds_a_vm_in_whichever_vm_project_holds_it(cli_runtime):
    rt, run = cli_runtime
    assert run("join", "b").exit_code == 0 and rt.asked == [VmKey(SECOND, "us-central1-a", "b")]
    assert run("join", "a", "--zone", "us-central1-a").exit_code == 0 and rt.asked[-1].project == HOST
    assert run("join", "a", "--zone", "us-central1-a", "--project", SECOND).exit_code == 0
    assert rt.asked[-1] == VmKey(SECOND, "us-central1-a", "a")
    refused = run("join", "a", "--project", OUTSIDER)
    assert refused.exit_code == 1 and "not among MESHJOIN_VM_PROJECTS" in refused.output and len(rt.asked) == 3


def test_the_cli_status_shows_each_vms_project(cli_runtime):
    rt, run = cli_runtime
    rows = json.loads(run("status", "--json").output)
    assert {(r["name"], r["project"]) for r in rows} == {("a", HOST), ("b", SECOND)}
    table = run("status").output
    assert "project" in table and SECOND in table
