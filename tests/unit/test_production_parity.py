"""Issue 13's defects, tested on the pure code and the in-memory adapters (no I/O).

Each test is named after the defect it pins down. The end-to-end proofs against the stricter sandbox
(IAM from Terraform, RBAC by token identity, quotas, booted guests) live with the sandbox.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.api_core import exceptions as gexc

from meshjoin import bootstrap, names
from meshjoin.status import Status
from meshjoin.adapters import ratelimit, retry
from meshjoin.adapters.compute import guest_items, unreachable_zones
from meshjoin.errors import ApiPermissionError, TransientError
from meshjoin.fleet import explain, fleet_rows
from meshjoin.plan import AgentReport, confirmed
from meshjoin.reconcile import Reconciler
from meshjoin.status import normalize_serial
from meshjoin.settings import Settings
from meshjoin.sweep import JOIN, PRUNE, Inventory, Sweeper, plan_sweep

from .test_hostile_input import (KEY, NOW, SETTINGS, FakeCompute, FakeKube, FakeSecrets, plugin_ca,  # noqa: F401
                                 vm_with)

PROJECT_SCRIPT = "#!/bin/bash\necho the project's own boot work\n"


def status_of(compute: FakeCompute, key=KEY) -> dict:
    return Status.decode(compute.vms[key].metadata[names.STATUS_KEY]).wire()


def entries(kube: FakeKube) -> list[str]:
    return sorted(f"{ns}/{name}" for (kind, ns, name) in kube.objects if kind == "WorkloadEntry")


# --- defect 3: the VM's own truth ----------------------------------------------------------------------------


@pytest.fixture
def world(plugin_ca):
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})})
    kube = FakeKube()
    secrets = FakeSecrets(plugin_ca)
    return compute, kube, secrets, Reconciler(SETTINGS, compute, secrets, kube, clock=lambda: NOW)


def test_defect3_a_new_vm_waits_without_traffic_until_its_agent_confirms(world):
    compute, kube, _, reconciler = world
    outcome = reconciler.reconcile(KEY)
    status = status_of(compute)
    assert (outcome.verb, outcome.state, status["state"]) == ("bootstrapped", "waiting", "waiting")
    assert entries(kube) == [], "no WorkloadEntry (no traffic) before the VM confirmed"
    assert "sudo google_metadata_script_runner startup" in status["reason"] and "reboot" in status["reason"]
    assert "meshjoin/csr" in status["reason"]  # what is awaited: the VM's key
    assert compute.vms[KEY].metadata[names.GUEST_ATTRIBUTES_KEY] == "TRUE"

    # Re-checked while the agent has not handed in its key: nothing changes, nothing is written.
    writes = compute.writes
    assert reconciler.reconcile(KEY).verb == "rechecked"
    assert compute.writes == writes and entries(kube) == []

    compute.hand_in_key(KEY)
    outcome = reconciler.reconcile(KEY)
    assert (outcome.verb, outcome.state) == ("delivered", "waiting") and entries(kube) == []
    assert "confirm" in status_of(compute)["reason"]
    writes = compute.writes
    assert reconciler.reconcile(KEY).verb == "rechecked" and compute.writes == writes

    compute.confirm(KEY)
    outcome = reconciler.reconcile(KEY)
    status = status_of(compute)
    assert (outcome.verb, status["state"]) == ("registered", "joined")
    assert status["confirmedSerial"] == status["certSerial"]
    assert entries(kube) == ["default/vm-1-us-central1-a-my-project"]


@pytest.mark.parametrize("report, why", [
    ({"cert-serial": "ab", "sidecar": "running"}, "another certificate"),
    ({"sidecar": "running"}, "no certificate"),
    (None, "serial of the delivery, sidecar stopped"),
    (None, "serial of the delivery, sidecar failed"),
    ({"cert-serial": "zz", "sidecar": "running"}, "not hex"),
])
def test_defect3_only_the_delivered_serial_with_a_running_sidecar_confirms(world, report, why):
    compute, kube, _, reconciler = world
    reconciler.reconcile(KEY)  # the bootstrap: the VM's agent acts once it is there
    compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    if report is None:
        compute.confirm(KEY, sidecar=why.rsplit(" ", 1)[-1])
    else:
        compute.guest[KEY].update(report)
    outcome = reconciler.reconcile(KEY)
    assert outcome.state == "waiting", why
    assert entries(kube) == []
    assert "agent" in status_of(compute)["reason"]


def test_defect3_confirmation_survives_a_renewal_but_not_a_new_identity(world):
    compute, kube, _, reconciler = world
    reconciler.reconcile(KEY)  # the bootstrap: the VM's agent acts once it is there
    compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    compute.confirm(KEY)
    reconciler.reconcile(KEY)
    renewal = Reconciler(SETTINGS, compute, reconciler.secrets, kube, clock=lambda: NOW + timedelta(hours=20))
    outcome = renewal.reconcile(KEY)
    assert (outcome.verb, outcome.state) == ("renewed", "joined"), "a renewal keeps the serving VM in traffic"
    assert entries(kube) == ["default/vm-1-us-central1-a-my-project"]

    vm = compute.vms[KEY]
    # The account bound to apps/web (labels only choose among an account's bindings).
    compute.vms[KEY] = vm_with({"mesh": "join", "mesh-namespace": "apps"}, dict(vm.metadata),
                               service_account="other@my-project.iam.gserviceaccount.com")
    outcome = renewal.reconcile(KEY)
    assert outcome.state == "waiting", "a new identity must be confirmed afresh"
    assert entries(kube) == [], "the old entry is withdrawn while the new identity is unconfirmed"


def test_defect3_agent_reports_are_validated_and_normalised():
    assert normalize_serial("serial=0A1B") == "a1b"
    assert normalize_serial("0a:1b") == "a1b"
    assert normalize_serial("x" * 3) is None and normalize_serial("f" * 65) is None
    report = AgentReport.from_attributes({"cert-serial": "00FF", "sidecar": "running\n", "agent-version": "2\x00"})
    assert (report.cert_serial, report.sidecar, report.agent_version) == ("ff", "", "")
    assert confirmed(AgentReport(cert_serial="ff", sidecar="running"), "ff")
    assert not confirmed(AgentReport(cert_serial="ff", sidecar="running"), "")
    assert AgentReport.from_attributes({}) is None


def test_defect3_guest_attributes_answer_is_read_in_the_real_apis_shape():
    body = {"kind": "compute#guestAttributes", "queryPath": "meshjoin/", "queryValue": {"items": [
        {"namespace": "meshjoin", "key": "cert-serial", "value": "ab"},
        {"namespace": "meshjoin", "key": "sidecar", "value": "running"},
        {"namespace": "hostkeys", "key": "ssh-ed25519", "value": "AAAA"},
        {"namespace": "meshjoin", "key": "odd", "value": 7}]}}
    assert guest_items(body) == {"cert-serial": "ab", "sidecar": "running"}
    assert guest_items({"kind": "compute#guestAttributes", "queryPath": "meshjoin/"}) == {}


def test_defect3_sweep_rechecks_waiting_vms_and_reports_those_waiting_too_long(world):
    compute, kube, secrets, reconciler = world
    reconciler.reconcile(KEY)  # the bootstrap: the VM's agent acts once it is there
    compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    vm = compute.vms[KEY]
    inventory = Inventory({KEY: vm}, [], [], {})
    plan = plan_sweep(inventory, SETTINGS, "ca-fingerprint", NOW + timedelta(minutes=5))
    assert [(a.kind, a.reason) for a in plan.actions] == [(JOIN, "waiting for the VM to confirm")]
    assert plan.notes == []
    late = plan_sweep(inventory, SETTINGS, "ca-fingerprint", NOW + SETTINGS.confirm_timeout + timedelta(minutes=1))
    assert [(note.severity, note.outcome) for note in late.notes
            if "to confirm" in note and "google_metadata_script_runner" in note] == [("WARNING", "overdue")]


def test_defect3_status_and_explain_show_waiting_and_the_agents_report(world):
    compute, kube, _, reconciler = world
    reconciler.reconcile(KEY)  # the bootstrap: the VM's agent acts once it is there
    compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    compute.guest[KEY].update({"agent-version": "3", "cert-serial": "1", "sidecar": "failed", "updated": "t"})
    reconciler.reconcile(KEY)
    rows = fleet_rows(Inventory({KEY: compute.vms[KEY]}, [], [], {}), NOW, SETTINGS)
    assert rows[0].state == "waiting" and "sidecar failed" in rows[0].agent
    result = explain(KEY, compute.vms[KEY], SETTINGS, entry_exists=False, now=NOW, agent_report=compute.guest[KEY])
    assert "sidecar failed" in result.facts["agent report"]
    assert any("google_metadata_script_runner" in advice for advice in result.advice)
    assert any("no mesh traffic" in advice for advice in result.advice)


# --- defect 5: the project's own startup-script ---------------------------------------------------------------


def test_defect5_a_project_wide_startup_script_is_not_overridden(plugin_ca):
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})}, project={names.STARTUP_SCRIPT_KEY: PROJECT_SCRIPT})
    Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW).reconcile(KEY)
    metadata = compute.vms[KEY].metadata
    assert names.STARTUP_SCRIPT_KEY not in metadata, "an instance item would replace the project's script"
    warnings = " ".join(status_of(compute).get("warnings", []))
    assert "project" in warnings and "/usr/local/sbin/meshjoin-agent" in warnings


def test_defect5_meshjoins_earlier_instance_script_yields_to_a_new_project_script(plugin_ca):
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})})
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW)
    reconciler.reconcile(KEY)
    assert names.STARTUP_SCRIPT_MARKER in compute.vms[KEY].metadata[names.STARTUP_SCRIPT_KEY]
    compute.project[names.STARTUP_SCRIPT_KEY] = PROJECT_SCRIPT
    reconciler.reconcile(KEY)
    assert names.STARTUP_SCRIPT_KEY not in compute.vms[KEY].metadata


def test_defect5_a_project_script_that_is_meshjoins_own_does_not_stop_the_instance_item(plugin_ca):
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})},
                          project={names.STARTUP_SCRIPT_KEY: bootstrap.startup_script()})
    Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW).reconcile(KEY)
    assert names.STARTUP_SCRIPT_MARKER in compute.vms[KEY].metadata[names.STARTUP_SCRIPT_KEY]


# --- defect 7: one VM's failure is that VM's -------------------------------------------------------------------


class RefusingReconciler:
    """A reconciler whose prune of one Service and reconcile of one VM are refused (403 / a bug)."""

    def __init__(self, failures: dict):
        self.failures = failures
        self.done: list[str] = []

    def reconcile(self, key, vm=None, cleanup=False, legacy_secret=False, read_agent=True):
        if key.instance in self.failures:
            raise self.failures[key.instance]
        self.done.append(key.instance)
        from meshjoin.reconcile import Outcome
        return Outcome("registered", "ok", state="joined")

    def prune_service(self, namespace, name):
        raise ApiPermissionError("kubernetes GET /api/v1/namespaces/apps/services/x: 403; grant RBAC verb get")


def test_defect7_a_permission_error_on_one_vm_does_not_abort_the_sweep():
    from meshjoin.sweep import PRUNE_SERVICE, Action, SweepPlan

    keys = [KEY.__class__(KEY.project, KEY.zone, f"vm-{i}") for i in range(4)]
    reconciler = RefusingReconciler({"vm-1": ApiPermissionError("instances.setMetadata: permission denied"),
                                     "vm-2": ValueError("a bug on one VM's data")})
    sweeper = Sweeper(SETTINGS, reconciler, clock=lambda: NOW)
    plan = SweepPlan([Action(JOIN, k, "test") for k in keys] + [Action(PRUNE_SERVICE, None, "x", "apps/x")], 0, 0, 0)
    counts = dict.fromkeys(("joined", "waiting", "renewed", "reissued", "pruned", "denied", "errors", "deferred"), 0)
    errors: list[str] = []
    sweeper._execute(plan, Inventory({}, [], [], {}), counts, errors, started=__import__("time").monotonic(),
                     progress=None)
    assert sorted(reconciler.done) == ["vm-0", "vm-3"], "the other VMs were still reconciled"
    assert counts["errors"] == 3 and counts["joined"] == 2
    assert any("ApiPermissionError" in e for e in errors) and any("ValueError" in e for e in errors)


# --- defect 8: quotas -------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_defect8_the_bucket_paces_a_burst_to_the_rate():
    clock = FakeClock()
    bucket = ratelimit.TokenBucket(300, clock=clock, sleep=clock.sleep)  # 5/s, burst of 25
    for _ in range(25 + 300):
        bucket.acquire()
    # 300 calls beyond the burst at 5 per second take 60 s of (simulated) waiting.
    assert clock.now == pytest.approx(60.0, abs=0.5)


def test_defect8_a_sweeps_published_work_fits_inside_computes_quota():
    """The sweep's budget (renewal-equivalents per interval) spends at most MESHJOIN_SWEEP_WORK_SHARE of
    every quota over the interval, counting every call a renewal and its key rotations make."""
    from meshjoin import capacity

    settings = SETTINGS
    budget = capacity.sweep_work_budget(settings)
    minutes = settings.sweep_interval.total_seconds() / 60
    use = capacity.quota_use(settings, {capacity.RENEW: budget}, minutes)
    assert max(use.values()) <= settings.sweep_work_share + 1e-9
    assert max(use.values()) > settings.sweep_work_share * 0.95, "the budget leaves a bound quota idle"
    small = Settings(project="p", cluster=SETTINGS.cluster, compute_reads_per_minute=100)
    assert capacity.sweep_work_budget(small) < budget / 10
    # Secret Manager's quota does not bound renewals: they make no Secret Manager call.
    assert capacity.sweep_work_budget(Settings(project="p", cluster=SETTINGS.cluster,
                                               secretmanager_writes_per_minute=1)) == budget


def test_defect8_quota_errors_back_off_past_the_minute_and_honour_retry_after():
    clock = FakeClock()
    calls = []

    def over_quota():
        calls.append(clock.now)
        if len(calls) < 6:
            raise gexc.TooManyRequests("Quota exceeded for quota metric 'Write requests'")
        return "ok"

    result = retry.call(over_quota, what="add version", permission="secretmanager.versions.add", attempts=2,
                        sleep=clock.sleep)
    assert result == "ok" and len(calls) == 6, "quota errors retry beyond the ordinary attempt count"
    assert clock.slept == [4.0, 8.0, 16.0, 32.0, 32.0]
    assert sum(clock.slept) > 60, "the backoff outlasts the quota's one-minute window"

    named = gexc.TooManyRequests("slow down", response=type("R", (), {"headers": {"Retry-After": "17"}})())
    assert retry.quota_wait(1, named) == 17.0
    compute_rate = gexc.Forbidden("Rate Limit Exceeded", errors=[{"reason": "rateLimitExceeded"}])
    assert retry.is_quota_error(compute_rate) and retry.is_transient(compute_rate)
    assert not retry.is_quota_error(gexc.Forbidden("Required 'compute.instances.get' permission"))


def test_defect8_quota_retries_stop_after_the_window():
    clock = FakeClock()

    def always_over():
        raise gexc.TooManyRequests("Quota exceeded")

    with pytest.raises(TransientError, match="rate quota"):
        retry.call(always_over, what="add version", permission="p", attempts=2, sleep=clock.sleep, quota_window=0.0)


# --- defect 9: partial listings and long operations ---------------------------------------------------------------


def test_defect9_unreachable_zones_are_read_from_both_forms():
    body = {"items": {"zones/us-central1-a": {"instances": []},
                      "zones/us-east1-b": {"warning": {"code": "UNREACHABLE", "message": "zone unavailable"}},
                      "zones/us-west1-c": {"warning": {"code": "NO_RESULTS_ON_PAGE"}}},
            "unreachables": ["zones/europe-west4-a"]}
    assert unreachable_zones(body) == {"us-east1-b", "europe-west4-a"}


def test_defect9_a_degraded_zone_costs_only_its_own_vms(world):
    compute, kube, secrets, reconciler = world
    ours = KEY
    elsewhere = KEY.__class__(KEY.project, "us-east1-b", "vm-east")
    entry = lambda key: {"metadata": {"namespace": "default", "name": f"{key.instance}-{key.zone}-{key.project}",  # noqa: E731
                                      "labels": {"app": key.instance},
                                      "annotations": {names.ANNOTATION_PREFIX + "project": key.project,
                                                      names.ANNOTATION_PREFIX + "zone": key.zone,
                                                      names.ANNOTATION_PREFIX + "instance": key.instance}}}
    gone = KEY.__class__(KEY.project, "us-central1-a", "vm-gone")
    inventory = Inventory({ours: compute.vms[ours]}, [entry(elsewhere), entry(gone)], [], {elsewhere: "s"},
                          unreachable_zones=frozenset({"us-east1-b"}))
    plan = plan_sweep(inventory, SETTINGS, "ca-fingerprint", NOW)
    pruned = {a.key for a in plan.actions if a.kind == PRUNE}
    assert pruned == {gone}, "the unreachable zone's VM is neither pruned; a reachable zone's orphan still is"
    assert any("us-east1-b" in note for note in plan.notes)
    rows = {r.name: r.state for r in fleet_rows(inventory, NOW, SETTINGS)}
    assert rows["vm-east"] == "unreachable"


def test_defect9_operation_waits_outlast_the_servers_two_minute_hold():
    from meshjoin.adapters import compute

    assert compute.OPERATION_WAIT_TIMEOUT > 120
    assert compute.OPERATION_PATIENCE >= compute.OPERATION_WAIT_TIMEOUT


# --- defect 1: the functions' token ---------------------------------------------------------------------------------


def test_defect1_runtime_asks_for_a_token_gke_maps_to_the_email(monkeypatch):
    import google.auth

    from meshjoin.runtime import Runtime

    asked = {}

    def default(scopes=None):
        asked["scopes"] = scopes
        return object(), "p"

    monkeypatch.setattr(google.auth, "default", default)
    Runtime(SETTINGS).credentials
    assert set(asked["scopes"]) == {"https://www.googleapis.com/auth/cloud-platform",
                                    "https://www.googleapis.com/auth/userinfo.email"}
