"""VM lifecycle, operations, project metadata, the guest (startup script, guest attributes) and quotas
of the sandbox, through the unmodified google-cloud-compute / secretmanager REST clients."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import requests
from google.api_core import exceptions
from google.cloud import compute_v1, secretmanager_v1
from google.oauth2.credentials import Credentials

from meshjoin_sandbox.compute import ComputeEmulator
from meshjoin_sandbox.guest import GuestAttributes, Guests
from meshjoin_sandbox.lifecycle import Timing
from meshjoin_sandbox.quota import MINUTE, compute_quotas, secret_manager_quotas, time_factor_from_env
from meshjoin_sandbox.secretmanager import SecretManagerEmulator
from meshjoin_sandbox.server import sink_accepts, sink_methods
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import CLOUD_PLATFORM, World

Status = compute_v1.Operation.Status
ZONE = "us-central1-a"
FLAVOR = {"Metadata-Flavor": "Google"}


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server():
    slot = {}
    server = serve(lambda environ, start: slot["app"](environ, start), "127.0.0.1", 0, name="compute")
    yield slot, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def gce(server, tmp_path):
    slot, url = server
    world = World(timing=Timing(boot_seconds=0.4, stop_seconds=0.2, operation_seconds=0.3))
    events: list[dict] = []
    world.publish_audit = events.append
    emulator = ComputeEmulator(world)
    guests = Guests(world, tmp_path / "vms")
    slot["app"] = emulator.app
    options, creds = {"api_endpoint": url}, Credentials(world.admin_token)
    yield SimpleNamespace(
        world=world, emulator=emulator, guests=guests, events=events, url=url, project=world.project,
        instances=compute_v1.InstancesClient(transport="rest", client_options=options, credentials=creds),
        operations=compute_v1.ZoneOperationsClient(transport="rest", client_options=options, credentials=creds),
        projects=compute_v1.ProjectsClient(transport="rest", client_options=options, credentials=creds),
        global_operations=compute_v1.GlobalOperationsClient(transport="rest", client_options=options,
                                                            credentials=creds))
    guests.shutdown()  # what the guests started (watcher units, scripts still running) ends with the test


def insert(gce, name, metadata=None, wait=True):
    resource = compute_v1.Instance(name=name, metadata=compute_v1.Metadata(
        items=[compute_v1.Items(key=k, value=v) for k, v in (metadata or {}).items()]))
    op = gce.instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=resource)
    if wait:
        wait_op(gce, op)
    return op


def wait_op(gce, op):
    done = gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name)
    assert done.status == Status.DONE
    return done


def status(gce, name):
    return gce.instances.get(project=gce.project, zone=ZONE, instance=name).status


def statuses(gce, name):
    return [s for z, n, s in gce.emulator.lifecycle.history if (z, n) == (ZONE, name)]


# ---- lifecycle and operations ------------------------------------------------------------------------


def test_insert_goes_provisioning_staging_running_and_its_operation_finishes_with_the_boot(gce):
    op = insert(gce, "vm-1", wait=False)
    assert op.status == Status.RUNNING
    assert status(gce, "vm-1") == "PROVISIONING"
    assert gce.operations.get(project=gce.project, zone=ZONE, operation=op.name).status == Status.RUNNING
    done = wait_op(gce, op)  # the server holds the wait until the operation is DONE
    assert done.progress == 100 and done.end_time
    assert status(gce, "vm-1") == "RUNNING"
    assert statuses(gce, "vm-1") == ["PROVISIONING", "STAGING", "RUNNING"]


def test_wait_returns_a_running_operation_at_the_wait_limit(gce):
    """zoneOperations.wait holds at most its limit (2 minutes, scaled) and answers the operation as is."""
    gce.world.timing.time_factor = 0.005  # a 0.6 s limit
    gce.world.timing.boot_seconds = 30.0
    op = insert(gce, "slow", wait=False)
    held = gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name)
    assert held.status == Status.RUNNING and status(gce, "slow") == "PROVISIONING"


def test_stop_start_reset_are_real_methods_with_audit_entries(gce):
    insert(gce, "vm-2")
    gce.events.clear()
    op = gce.instances.stop_unary(project=gce.project, zone=ZONE, instance="vm-2")
    assert op.operation_type == "stop" and status(gce, "vm-2") == "STOPPING"
    wait_op(gce, op)
    assert status(gce, "vm-2") == "TERMINATED"
    with pytest.raises(exceptions.BadRequest, match="not ready"):
        gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="vm-2")
    wait_op(gce, gce.instances.start_unary(project=gce.project, zone=ZONE, instance="vm-2"))
    assert status(gce, "vm-2") == "RUNNING"
    wait_op(gce, gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="vm-2"))
    assert status(gce, "vm-2") == "RUNNING"
    assert statuses(gce, "vm-2")[3:] == ["STOPPING", "TERMINATED", "PROVISIONING", "STAGING", "RUNNING", "RUNNING"]
    methods = [(e["protoPayload"]["methodName"], next(k for k in ("first", "last") if e["operation"].get(k)))
               for e in gce.events]
    assert methods == [(f"v1.compute.instances.{verb}", phase) for verb in ("stop", "start", "reset")
                       for phase in ("first", "last")]


def test_the_last_audit_entry_is_written_when_the_operation_finishes(gce):
    insert(gce, "slow-labels")
    gce.events.clear()
    gce.world.timing.operation_seconds = 600.0  # never finishes within this test
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="slow-labels")
    labels = compute_v1.InstancesSetLabelsRequest(labels={"mesh": "join"}, label_fingerprint=vm.label_fingerprint)
    gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="slow-labels",
                                   instances_set_labels_request_resource=labels)
    assert [(e["protoPayload"]["methodName"], e["operation"].get("first")) for e in gce.events] == [
        ("v1.compute.instances.setLabels", True)]


def test_the_log_router_sink_forwards_what_its_terraform_filter_names(gce):
    """insert, delete, setLabels, stop and start reach the topic (deploy/terraform/pubsub.tf); reset and
    setMetadata (meshjoin's own writes) do not."""
    assert sink_methods() == {f"{v}.compute.instances.{m}" for v in ("v1", "beta")
                              for m in ("insert", "delete", "setLabels", "stop", "start")}
    insert(gce, "sunk")
    wait_op(gce, gce.instances.stop_unary(project=gce.project, zone=ZONE, instance="sunk"))
    wait_op(gce, gce.instances.start_unary(project=gce.project, zone=ZONE, instance="sunk"))
    wait_op(gce, gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="sunk"))
    forwarded = {e["protoPayload"]["methodName"] for e in gce.events if sink_accepts(e)}
    assert forwarded == {"v1.compute.instances.insert", "v1.compute.instances.stop", "v1.compute.instances.start"}
    assert "v1.compute.instances.reset" in {e["protoPayload"]["methodName"] for e in gce.events}


def set_service_account(gce, name: str, email: str, scopes=(CLOUD_PLATFORM,)):
    request = compute_v1.InstancesSetServiceAccountRequest(email=email, scopes=list(scopes))
    return gce.instances.set_service_account_unary(project=gce.project, zone=ZONE, instance=name,
                                                   instances_set_service_account_request_resource=request)


def test_set_service_account_only_when_stopped_then_the_guest_speaks_as_the_new_account(gce):
    """instances.setServiceAccount as GCE has it: 400 on a VM that is not TERMINATED, an operation
    otherwise; the VM's metadata server mints the new account's tokens after the next start. Its audit
    entry exists but the sink's filter (deploy/terraform) does not forward it."""
    orders, other = (f"{n}@{gce.project}.iam.gserviceaccount.com" for n in ("orders", "other"))
    resource = compute_v1.Instance(name="moved", service_accounts=[
        compute_v1.ServiceAccount(email=orders, scopes=[CLOUD_PLATFORM])])
    wait_op(gce, gce.instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=resource))
    with pytest.raises(exceptions.BadRequest) as refused:
        set_service_account(gce, "moved", other)
    assert refused.value.response.json()["error"]["message"] == \
        "The instance must be stopped before the service account can be changed."
    assert gce.emulator.instance(ZONE, "moved")["serviceAccounts"][0]["email"] == orders
    wait_op(gce, gce.instances.stop_unary(project=gce.project, zone=ZONE, instance="moved"))
    wait_for(lambda: status(gce, "moved") == "TERMINATED", what="TERMINATED")
    gce.events.clear()
    op = set_service_account(gce, "moved", other)
    assert op.operation_type == "setServiceAccount"
    wait_op(gce, op)
    assert [dict(a) for a in gce.emulator.instance(ZONE, "moved")["serviceAccounts"]] == [
        {"email": other, "scopes": [CLOUD_PLATFORM]}]
    audited = [e["protoPayload"]["methodName"] for e in gce.events]
    assert audited == ["v1.compute.instances.setServiceAccount"] * 2
    assert not any(sink_accepts(e) for e in gce.events), "the sink's filter does not name setServiceAccount"
    wait_op(gce, gce.instances.start_unary(project=gce.project, zone=ZONE, instance="moved"))
    host = gce.guests.metadata_host(ZONE, "moved")
    issued = requests.get(f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token",
                          headers=FLAVOR, timeout=10).json()
    assert gce.world.principal_of(issued["access_token"]).email == other


def test_delete_during_boot_cancels_the_boot(gce):
    op = insert(gce, "gone", wait=False)
    wait_op(gce, gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="gone"))
    wait_op(gce, op)  # the insert's operation still finishes
    assert "RUNNING" not in statuses(gce, "gone")


# ---- project metadata --------------------------------------------------------------------------------


def set_common(gce, items: dict):
    project = gce.projects.get(project=gce.project)
    body = compute_v1.Metadata(fingerprint=project.common_instance_metadata.fingerprint,
                               items=[compute_v1.Items(key=k, value=v) for k, v in items.items()])
    op = gce.projects.set_common_instance_metadata_unary(project=gce.project, metadata_resource=body)
    assert op.status == Status.RUNNING
    done = gce.global_operations.wait(project=gce.project, operation=op.name)
    assert done.status == Status.DONE


def test_project_metadata_with_fingerprint_and_instance_precedence(gce):
    set_common(gce, {"startup-script": "echo project", "color": "blue"})
    project = gce.projects.get(project=gce.project)
    assert {i.key: i.value for i in project.common_instance_metadata.items} == {
        "startup-script": "echo project", "color": "blue"}
    stale = compute_v1.Metadata(fingerprint="c3RhbGU=", items=[])
    with pytest.raises(exceptions.PreconditionFailed):
        gce.projects.set_common_instance_metadata_unary(project=gce.project, metadata_resource=stale)

    insert(gce, "own", metadata={"startup-script": "echo instance"})
    insert(gce, "plain")
    assert gce.emulator.metadata_value(ZONE, "own", "startup-script") == "echo instance"
    assert gce.emulator.metadata_value(ZONE, "plain", "startup-script") == "echo project"
    host = gce.guests.metadata_host(ZONE, "own")
    base = f"http://{host}/computeMetadata/v1"
    assert requests.get(f"{base}/project/attributes/color", headers=FLAVOR, timeout=5).text == "blue"
    assert requests.get(f"{base}/instance/attributes/startup-script", headers=FLAVOR, timeout=5).text == "echo instance"


# ---- the guest: startup script at boot only, in the VM's own root ------------------------------------

SCRIPT = """#!/bin/bash
set -e
echo boot >> "$MESHJOIN_ROOT/boots"
curl -sf -H 'Metadata-Flavor: Google' "http://$GCE_METADATA_HOST/computeMetadata/v1/instance/name" > "$MESHJOIN_ROOT/name"
systemctl restart demo.service
"""


def boots(gce, name) -> int:
    """Finished runs of the startup script (the runner logs each exit status on the serial console)."""
    serial = gce.guests.vm_dir(ZONE, name) / "serial.log"
    return serial.read_text().count("startup-script exit status") if serial.exists() else 0


def test_startup_script_runs_at_each_boot_only_in_the_vms_own_root(gce):
    insert(gce, "guest-1", metadata={"startup-script": SCRIPT})
    wait_for(lambda: boots(gce, "guest-1") == 1, what="first boot's script")
    root = gce.guests.vm_dir(ZONE, "guest-1") / "root"
    assert (root / "name").read_text() == "guest-1"  # through its own metadata server
    assert (gce.guests.vm_dir(ZONE, "guest-1") / "log" / "systemctl").read_text() == "restart demo.service\n"

    # setLabels and setMetadata never run it; a reset does.
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="guest-1")
    labels = compute_v1.InstancesSetLabelsRequest(labels={"mesh": "join"}, label_fingerprint=vm.label_fingerprint)
    wait_op(gce, gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="guest-1",
                                                instances_set_labels_request_resource=labels))
    ran = gce.guests.run_startup(ZONE, "guest-1")  # the manual runner, as a person would on the VM
    assert ran["ran"] and ran["returncode"] == 0 and boots(gce, "guest-1") == 2
    wait_op(gce, gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="guest-1"))
    wait_for(lambda: boots(gce, "guest-1") == 3, what="the reset's boot")
    assert gce.guests.boots[(ZONE, "guest-1")] == 2  # insert + reset; setLabels booted nothing
    assert "startup-script exit status 0" in (gce.guests.vm_dir(ZONE, "guest-1") / "serial.log").read_text()
    assert len((root / "boots").read_text().splitlines()) == 3


AGENT_SCRIPT = """#!/bin/bash
set -e
md="http://$GCE_METADATA_HOST/computeMetadata/v1"
curl -sf -H 'Metadata-Flavor: Google' "$md/instance/service-accounts/default/token" > "$MESHJOIN_ROOT/token.json"
curl -sf -X PUT -H 'Metadata-Flavor: Google' --data running "$md/instance/guest-attributes/meshjoin/sidecar"
"""


def test_the_guests_metadata_server_issues_the_vms_token_and_takes_its_guest_attributes(gce):
    """One server per VM, the one its startup script (the agent) is given: the VM's own identity, scopes
    fixed at insert, and the guest-attributes endpoint."""
    account = f"orders@{gce.project}.iam.gserviceaccount.com"
    resource = compute_v1.Instance(
        name="agent-1",
        service_accounts=[compute_v1.ServiceAccount(email=account, scopes=[CLOUD_PLATFORM])],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key="startup-script", value=AGENT_SCRIPT),
                                            compute_v1.Items(key="enable-guest-attributes", value="TRUE")]))
    wait_op(gce, gce.instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=resource))
    wait_for(lambda: boots(gce, "agent-1") == 1, what="the agent's boot")
    assert "startup-script exit status 0" in (gce.guests.vm_dir(ZONE, "agent-1") / "serial.log").read_text()
    issued = json.loads((gce.guests.vm_dir(ZONE, "agent-1") / "root" / "token.json").read_text())
    principal = gce.world.principal_of(issued["access_token"])
    assert principal.email == account and principal.scopes == {CLOUD_PLATFORM}
    attributes = gce.instances.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
        project=gce.project, zone=ZONE, instance="agent-1", variable_key="meshjoin/sidecar"))
    assert attributes.variable_value == "running"
    # The VM's token is the VM's account, which holds no Compute permission: it cannot read them itself.
    as_vm = compute_v1.InstancesClient(transport="rest", client_options={"api_endpoint": gce.url},
                                       credentials=Credentials(issued["access_token"]))
    with pytest.raises(exceptions.Forbidden, match="compute.instances.getGuestAttributes"):
        as_vm.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
            project=gce.project, zone=ZONE, instance="agent-1", variable_key="meshjoin/sidecar"))


CLONE_SCRIPT = """#!/bin/bash
id="$(curl -sf -H 'Metadata-Flavor: Google' "http://$GCE_METADATA_HOST/computeMetadata/v1/instance/id")"
if [ -f "$MESHJOIN_ROOT/etc/certs/key.pem" ]; then key=present; else key=absent; fi
echo "$id key=$key" >> "$MESHJOIN_ROOT/boots"
"""


def run_clone(gce, tmp_path, *args: str):
    """`meshjoin sandbox clone ...` against this test's emulator (its state dir holds the guests' roots)."""
    from click.testing import CliRunner

    from meshjoin_sandbox.cli import sandbox as sandbox_cli
    from meshjoin_sandbox.config import SandboxConfig

    port = int(gce.url.rsplit(":", 1)[1])
    SandboxConfig(state_dir=str(tmp_path), ports={"compute": port}, sa_token="", admin_token=gce.world.admin_token,
                  ca_dir="", kube_ca_file="", kube_cert_file="", kube_key_file="", crd_path="",
                  project=gce.project).save()
    result = CliRunner().invoke(sandbox_cli, ["clone", *args, "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_clone_copies_what_a_machine_image_carries_and_with_disk_the_files_before_the_first_boot(gce, tmp_path):
    """`meshjoin sandbox clone`: NEW gets SOURCE's metadata (meshjoin's status and chain included),
    labels and account through instances.insert; --with-disk copies SOURCE's fake root into NEW's
    before NEW boots, so NEW's first startup script already finds the copied key (a disk clone)."""
    orders = f"orders@{gce.project}.iam.gserviceaccount.com"
    items = {"startup-script": CLONE_SCRIPT, "meshjoin-status": '{"state": "joined"}',
             "meshjoin-cert-chain": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
             "enable-guest-attributes": "TRUE"}
    resource = compute_v1.Instance(
        name="origin", labels={"mesh": "join", "mesh-app": "orders"},
        service_accounts=[compute_v1.ServiceAccount(email=orders, scopes=[CLOUD_PLATFORM])],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]))
    wait_op(gce, gce.instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=resource))
    wait_for(lambda: boots(gce, "origin") == 1, what="the source's first boot")
    certs = gce.guests.root(ZONE, "origin") / "etc" / "certs"
    certs.mkdir(parents=True)
    (certs / "key.pem").write_text("the source's private key")
    (certs / "key.pem").chmod(0o600)
    source = gce.emulator.instance(ZONE, "origin")
    gce.events.clear()

    assert "cloned us-central1-a/origin to us-central1-a/image-only" in run_clone(gce, tmp_path, "origin", "image-only")
    assert "with its disk" in run_clone(gce, tmp_path, "origin", "disk-copy", "--with-disk")
    other = f"other@{gce.project}.iam.gserviceaccount.com"
    run_clone(gce, tmp_path, "origin", "as-other", "--service-account", other)
    for name in ("image-only", "disk-copy", "as-other"):
        clone = gce.emulator.instance(ZONE, name)
        assert clone["id"] != source["id"]
        assert clone["metadata"]["items"] == source["metadata"]["items"]
        assert clone["labels"] == source["labels"]
        expected = other if name == "as-other" else orders
        assert clone["serviceAccounts"] == [{"email": expected, "scopes": [CLOUD_PLATFORM]}]
    inserts = [e for e in gce.events if e["operation"].get("first")]
    assert [e["protoPayload"]["methodName"] for e in inserts] == ["v1.compute.instances.insert"] * 3
    assert all(sink_accepts(e) for e in inserts), "a clone's creation reaches meshjoin like any insert"

    for name in ("image-only", "disk-copy"):
        wait_for(lambda name=name: boots(gce, name) == 1, what=f"{name}'s first boot")
    copied = gce.guests.root(ZONE, "disk-copy")
    assert (copied / "etc" / "certs" / "key.pem").read_text() == "the source's private key"
    assert (copied / "etc" / "certs" / "key.pem").stat().st_mode & 0o777 == 0o600
    clone_id = gce.emulator.instance(ZONE, "disk-copy")["id"]
    # The copied disk still has the source's boot record; the clone's first boot already saw the key.
    assert (copied / "boots").read_text().splitlines() == [f"{source['id']} key=absent", f"{clone_id} key=present"]
    fresh = gce.guests.root(ZONE, "image-only")
    assert not (fresh / "etc" / "certs").exists()
    assert (fresh / "boots").read_text().splitlines() == [f"{gce.emulator.instance(ZONE, 'image-only')['id']} key=absent"]


def test_a_failing_script_is_logged_and_breaks_nothing(gce):
    insert(gce, "broken", metadata={"startup-script": "echo about to fail; exit 7"})
    serial = gce.guests.vm_dir(ZONE, "broken") / "serial.log"
    wait_for(lambda: serial.exists() and "exit status 7" in serial.read_text(), what="the failed run in serial.log")
    assert "about to fail" in serial.read_text()
    assert status(gce, "broken") == "RUNNING"


# ---- guest attributes --------------------------------------------------------------------------------


def test_guest_attributes_are_written_only_by_the_vm_and_read_through_compute(gce):
    insert(gce, "ga", metadata={"enable-guest-attributes": "TRUE"})
    insert(gce, "off")
    base = f"http://{gce.guests.metadata_host(ZONE, 'ga')}/computeMetadata/v1/instance/guest-attributes"
    put = requests.put(f"{base}/meshjoin/sidecar", data="running", headers=FLAVOR, timeout=5)
    assert put.status_code == 200
    requests.put(f"{base}/meshjoin/agent-version", data="1.2.3", headers=FLAVOR, timeout=5).raise_for_status()
    assert requests.get(f"{base}/meshjoin/sidecar", headers=FLAVOR, timeout=5).text == "running"
    assert requests.get(f"{base}/meshjoin/", headers=FLAVOR, timeout=5).text.split() == ["agent-version", "sidecar"]
    instance = requests.get(base.rsplit("/", 1)[0] + "/", params={"recursive": "true"}, headers=FLAVOR, timeout=5)
    assert "guestAttributes" not in instance.json() and "guest-attributes" not in instance.json()

    url = f"{gce.url}/compute/v1/projects/{gce.project}/zones/{ZONE}/instances/ga/getGuestAttributes"
    auth = {"Authorization": f"Bearer {gce.world.admin_token}"}
    by_path = requests.get(url, params={"queryPath": "meshjoin/"}, headers=auth, timeout=5).json()
    assert by_path["kind"] == "compute#guestAttributes" and by_path["queryPath"] == "meshjoin/"
    assert by_path["queryValue"]["items"] == [
        {"namespace": "meshjoin", "key": "agent-version", "value": "1.2.3"},
        {"namespace": "meshjoin", "key": "sidecar", "value": "running"}]
    by_key = gce.instances.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
        project=gce.project, zone=ZONE, instance="ga", variable_key="meshjoin/sidecar"))
    assert (by_key.variable_key, by_key.variable_value) == ("meshjoin/sidecar", "running")

    # Not from outside the VM: the functions' own metadata server, or Compute itself, cannot set them.
    assert requests.post(url, data="x", headers=auth, timeout=5).status_code == 405
    off = f"http://{gce.guests.metadata_host(ZONE, 'off')}/computeMetadata/v1/instance/guest-attributes"
    assert requests.put(f"{off}/meshjoin/sidecar", data="x", headers=FLAVOR, timeout=5).status_code == 403
    with pytest.raises(exceptions.NotFound):
        gce.instances.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
            project=gce.project, zone=ZONE, instance="off", variable_key="meshjoin/sidecar"))


def test_guest_attributes_enabled_by_project_metadata_and_rate_limited():
    clock = SimpleNamespace(now=1000.0)
    store = GuestAttributes(time_factor=1.0, clock=lambda: clock.now)
    for second in range(4):
        for _ in range(3):
            if second * 3 + _ < 10:
                store.put("1", "ns", f"k{second}{_}", "v")
        clock.now += 1.0
    with pytest.raises(Exception, match="at most 10 a minute"):
        store.put("1", "ns", "late", "v")
    clock.now += 60
    store.put("1", "ns", "late", "v")
    for _ in range(2):
        store.put("1", "ns", "burst", "v")
    with pytest.raises(Exception, match="3 a second"):
        store.put("1", "ns", "burst", "v")


def test_project_level_enable_guest_attributes(gce):
    set_common(gce, {"enable-guest-attributes": "TRUE"})
    insert(gce, "proj-ga")
    assert gce.emulator.guest_attributes_enabled(ZONE, "proj-ga")
    insert(gce, "opt-out", metadata={"enable-guest-attributes": "FALSE"})  # the instance item wins
    assert not gce.emulator.guest_attributes_enabled(ZONE, "opt-out")


# ---- quotas --------------------------------------------------------------------------------------------


def test_time_factor_from_env():
    assert time_factor_from_env({}) == 1.0
    assert time_factor_from_env({"MESHJOIN_SANDBOX_TIME_FACTOR": "0.1"}) == 0.1
    for bad in ("0", "-1", "fast", "inf"):
        with pytest.raises(ValueError, match="MESHJOIN_SANDBOX_TIME_FACTOR"):
            time_factor_from_env({"MESHJOIN_SANDBOX_TIME_FACTOR": bad})


def test_quota_windows_are_synchronized_minutes_scaled_by_the_time_factor():
    clock = SimpleNamespace(now=600.0)
    quotas = secret_manager_quotas(time_factor=0.5, clock=lambda: clock.now)  # 30 s windows
    assert all(quotas.charge("1", "secrets.get") is None for _ in range(600))
    refused = quotas.charge("1", "secrets.get")
    assert refused is not None and refused.metric == "Read requests"
    assert quotas.charge("1", "secrets.versions.access") is None  # groups are counted apart
    assert quotas.charge("2", "secrets.get") is None  # and projects too
    clock.now += 29.9
    assert quotas.charge("1", "secrets.get") is not None
    clock.now += 0.1  # the next synchronized interval
    assert quotas.charge("1", "secrets.get") is None
    assert compute_quotas().window == MINUTE


@pytest.fixture
def secret_manager(server):
    slot, url = server
    world = World(timing=Timing(time_factor=1.0))
    emulator = SecretManagerEmulator(world)
    clock = SimpleNamespace(now=60.0 * 1000)
    emulator.quotas.clock = lambda: clock.now
    emulator.put("s", b"payload")
    slot["app"] = emulator.app
    client = secretmanager_v1.SecretManagerServiceClient(
        transport="rest", credentials=Credentials(world.admin_token), client_options={"api_endpoint": url})
    return SimpleNamespace(world=world, client=client, clock=clock, url=url)


def test_secret_manager_answers_429_resource_exhausted_over_600_writes_then_recovers(secret_manager):
    sm = secret_manager
    parent = f"projects/{sm.world.project}"
    for index in range(600):
        sm.client.create_secret(request={"parent": parent, "secret_id": f"w{index}",
                                         "secret": {"replication": {"automatic": {}}}})
    raw = requests.post(f"{sm.url}/v1/{parent}/secrets?secretId=over", json={"replication": {"automatic": {}}},
                        headers={"Authorization": f"Bearer {sm.world.admin_token}"}, timeout=5)
    assert raw.status_code == 429
    error = raw.json()["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert error["message"] == ("Quota exceeded for quota metric 'Write requests' and limit 'Write requests per "
                                f"minute' of service 'secretmanager.googleapis.com' for consumer "
                                f"'project_number:{sm.world.project_number}'.")
    assert error["details"][0]["reason"] == "RATE_LIMIT_EXCEEDED"
    with pytest.raises(exceptions.TooManyRequests):
        sm.client.add_secret_version(request={"parent": f"{parent}/secrets/s", "payload": {"data": b"x"}})
    # Reads and accesses have their own quotas.
    assert sm.client.access_secret_version(name=f"{parent}/secrets/s/versions/1").payload.data == b"payload"
    sm.clock.now += 60  # the next minute refills it
    sm.client.add_secret_version(request={"parent": f"{parent}/secrets/s", "payload": {"data": b"x"}})


def test_compute_answers_403_rate_limit_exceeded_over_its_read_quota(gce):
    clock = SimpleNamespace(now=60.0 * 5000)
    gce.emulator.quotas.clock = lambda: clock.now
    insert(gce, "q")
    url = f"{gce.url}/compute/v1/projects/{gce.project}/zones/{ZONE}/instances/q"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {gce.world.admin_token}"
    for _ in range(1500):
        assert session.get(url, timeout=5).status_code == 200
    refused = session.get(url, timeout=5)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["errors"][0]["reason"] == "rateLimitExceeded"
    assert "quota metric 'Read requests'" in error["message"] and "compute.googleapis.com" in error["message"]
    with pytest.raises(exceptions.Forbidden):
        gce.instances.get(project=gce.project, zone=ZONE, instance="q")
    clock.now += 60
    assert gce.instances.get(project=gce.project, zone=ZONE, instance="q").status == "RUNNING"
