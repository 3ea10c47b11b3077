"""The Compute Engine emulator, driven by the unmodified google-cloud-compute REST client.

Mutations answer a RUNNING operation; the product waits with the `*_unary` methods plus a
ZoneOperationsClient built on the same endpoint, because the ExtendedOperation returned by the plain
methods polls through a ZoneOperationsClient the transport builds without the endpoint override.
"""

from __future__ import annotations

import ipaddress
import threading
from datetime import datetime
from types import SimpleNamespace

import pytest
import requests
from google.api_core import exceptions
from google.auth.exceptions import RefreshError
from google.cloud import compute_v1
from google.oauth2.credentials import Credentials

from meshjoin_sandbox.compute import ComputeEmulator
from meshjoin_sandbox.iam import Binding
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import CLOUD_PLATFORM, World

Status = compute_v1.Operation.Status
ZONE = "us-central1-a"
OTHER_ZONE = "us-central1-b"


def make_clients(url: str, token: str):
    options = {"api_endpoint": url}
    credentials = Credentials(token)
    return (
        compute_v1.InstancesClient(transport="rest", client_options=options, credentials=credentials),
        compute_v1.ZoneOperationsClient(transport="rest", client_options=options, credentials=credentials),
    )


@pytest.fixture(scope="module")
def server():
    """One loopback server per module; each test plugs a fresh emulator into it (shutdown is slow)."""
    slot = {}
    server = serve(lambda environ, start: slot["app"](environ, start), "127.0.0.1", 0, name="compute")
    yield slot, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def gce(server):
    slot, url = server
    world = World()
    events: list[dict] = []
    world.publish_audit = events.append
    emulator = ComputeEmulator(world)
    slot["app"] = emulator.app
    instances, operations = make_clients(url, world.admin_token)
    return SimpleNamespace(world=world, emulator=emulator, url=url, events=events,
                           instances=instances, operations=operations, project=world.project)


def insert(gce, name, zone=ZONE, labels=None, metadata=None, headers=()):
    resource = compute_v1.Instance(
        name=name,
        labels=labels or {},
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in (metadata or {}).items()]),
    )
    op = gce.instances.insert_unary(project=gce.project, zone=zone, instance_resource=resource, metadata=headers)
    return gce.operations.wait(project=gce.project, zone=zone, operation=op.name)


def get(gce, name, zone=ZONE):
    return gce.instances.get(project=gce.project, zone=zone, instance=name)


def list_names(gce, filter_="", max_results=None, zone=ZONE):
    request = compute_v1.ListInstancesRequest(project=gce.project, zone=zone, filter=filter_)
    if max_results:
        request.max_results = max_results
    return [i.name for i in gce.instances.list(request=request)]


# ---- instances and operations -----------------------------------------------------------------------

def test_insert_returns_running_operation_then_done_and_instance_looks_like_gce(gce):
    resource = compute_v1.Instance(name="vm-1", labels={"mesh": "join"},
                                   machine_type=f"zones/{ZONE}/machineTypes/e2-small",
                                   metadata=compute_v1.Metadata(items=[compute_v1.Items(key="a", value="b")]))
    op = gce.instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=resource)
    assert op.status == Status.RUNNING and op.name.startswith("operation-")
    assert op.operation_type == "insert" and op.target_link.endswith(f"/zones/{ZONE}/instances/vm-1")

    assert get(gce, "vm-1").status == "PROVISIONING"  # the VM boots while the operation runs
    polled = gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name)
    assert polled.status == Status.DONE and polled.progress == 100

    vm = get(gce, "vm-1")
    zone_url = f"https://www.googleapis.com/compute/v1/projects/{gce.project}/zones/{ZONE}"
    assert vm.id == op.target_id and str(vm.id) == gce.emulator.instance(ZONE, "vm-1")["id"]
    assert vm.zone == zone_url and vm.self_link == f"{zone_url}/instances/vm-1"
    assert vm.machine_type == f"{zone_url}/machineTypes/e2-small"
    assert vm.status == "RUNNING" and vm.kind == "compute#instance"
    assert datetime.fromisoformat(vm.creation_timestamp).tzinfo is not None
    assert dict(vm.labels) == {"mesh": "join"} and vm.label_fingerprint
    assert [(i.key, i.value) for i in vm.metadata.items] == [("a", "b")] and vm.metadata.fingerprint
    assert ipaddress.ip_address(vm.network_interfaces[0].network_i_p) in ipaddress.ip_network("10.128.0.0/20")
    assert vm.network_interfaces[0].network.endswith(f"/projects/{gce.project}/global/networks/default")
    assert vm.service_accounts[0].email == gce.world.default_compute_sa and vm.service_accounts[0].scopes


def test_extended_operation_result_polls_the_endpoint_it_is_given(gce):
    # The pitfall: the transport's own ZoneOperationsClient ignores the api_endpoint override...
    assert gce.instances._transport._zone_operations_client._transport._host == "https://compute.googleapis.com"
    # ...so `.result()` only works once that client is replaced by one on the same endpoint.
    gce.instances._transport._extended_operations_services["zone_operations"] = gce.operations
    op = gce.instances.insert(project=gce.project, zone=ZONE, instance_resource=compute_v1.Instance(name="vm-1"))
    op.result(timeout=10)
    assert op.done() and op.error_code == 0
    assert get(gce, "vm-1").name == "vm-1"


def test_wait_on_an_unknown_operation_is_not_found(gce):
    with pytest.raises(exceptions.NotFound):
        gce.operations.wait(project=gce.project, zone=ZONE, operation="operation-nope")


def test_missing_instance_is_not_found_with_a_google_error_body(gce):
    with pytest.raises(exceptions.NotFound) as caught:
        get(gce, "ghost")
    assert "was not found" in caught.value.message
    assert caught.value.errors[0]["reason"] == "notFound"


def test_inserting_an_existing_name_conflicts(gce):
    insert(gce, "vm-1")
    with pytest.raises(exceptions.Conflict):
        insert(gce, "vm-1")


def test_invalid_name_is_rejected(gce):
    with pytest.raises(exceptions.BadRequest):
        insert(gce, "Bad_Name")


def test_delete_then_get_is_not_found(gce):
    insert(gce, "vm-1")
    op = gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="vm-1")
    assert op.status == Status.RUNNING and op.operation_type == "delete"
    assert gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name).status == Status.DONE
    with pytest.raises(exceptions.NotFound):
        get(gce, "vm-1")
    with pytest.raises(exceptions.NotFound):
        gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="vm-1")


def test_network_ips_are_unique_and_sequential(gce):
    seeded = [gce.emulator.seed_instance(ZONE, f"vm-{n}") for n in range(20)]
    insert(gce, "vm-api")
    ips = [i["networkInterfaces"][0]["networkIP"] for i in seeded]
    ips.append(get(gce, "vm-api").network_interfaces[0].network_i_p)
    assert len(set(ips)) == 21
    assert ips[:3] == ["10.128.0.2", "10.128.0.3", "10.128.0.4"]


def test_ids_are_unique_numeric_strings(gce):
    ids = [gce.emulator.seed_instance(ZONE, f"vm-{n}")["id"] for n in range(10)]
    assert len(set(ids)) == 10 and all(i.isdigit() for i in ids)


# ---- fingerprints -----------------------------------------------------------------------------------

def test_set_labels_needs_the_current_fingerprint(gce):
    insert(gce, "vm-1", labels={"mesh": "join"})
    stale = get(gce, "vm-1").label_fingerprint
    request = compute_v1.InstancesSetLabelsRequest(labels={"mesh": "join", "team": "a"}, label_fingerprint=stale)
    op = gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="vm-1",
                                        instances_set_labels_request_resource=request)
    gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name)
    vm = get(gce, "vm-1")
    assert dict(vm.labels) == {"mesh": "join", "team": "a"} and vm.label_fingerprint != stale

    with pytest.raises(exceptions.PreconditionFailed) as caught:
        gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="vm-1",
                                       instances_set_labels_request_resource=request)
    assert "Labels fingerprint either invalid or resource labels have changed" in caught.value.message
    assert caught.value.errors[0]["reason"] == "conditionNotMet"


def test_invalid_labels_are_rejected(gce):
    insert(gce, "vm-1")
    request = compute_v1.InstancesSetLabelsRequest(labels={"Mesh": "Join!"},
                                                   label_fingerprint=get(gce, "vm-1").label_fingerprint)
    with pytest.raises(exceptions.BadRequest):
        gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="vm-1",
                                       instances_set_labels_request_resource=request)


def test_set_metadata_needs_the_current_fingerprint(gce):
    insert(gce, "vm-1", metadata={"a": "1"})
    stale = get(gce, "vm-1").metadata.fingerprint
    fresh = compute_v1.Metadata(fingerprint=stale, items=[compute_v1.Items(key="a", value="2")])
    op = gce.instances.set_metadata_unary(project=gce.project, zone=ZONE, instance="vm-1", metadata_resource=fresh)
    assert op.status == Status.RUNNING
    assert gce.operations.wait(project=gce.project, zone=ZONE, operation=op.name).status == Status.DONE
    vm = get(gce, "vm-1")
    assert [(i.key, i.value) for i in vm.metadata.items] == [("a", "2")] and vm.metadata.fingerprint != stale

    with pytest.raises(exceptions.PreconditionFailed) as caught:
        gce.instances.set_metadata_unary(project=gce.project, zone=ZONE, instance="vm-1", metadata_resource=fresh)
    assert caught.value.errors[0]["reason"] == "conditionNotMet"


def test_metadata_values_over_gce_limits_are_rejected(gce):
    insert(gce, "vm-1")
    big = compute_v1.Metadata(fingerprint=get(gce, "vm-1").metadata.fingerprint,
                              items=[compute_v1.Items(key="blob", value="x" * (256 * 1024 + 1))])
    with pytest.raises(exceptions.BadRequest):
        gce.instances.set_metadata_unary(project=gce.project, zone=ZONE, instance="vm-1", metadata_resource=big)


# ---- listing: filters and pages ---------------------------------------------------------------------

@pytest.fixture
def fleet(gce):
    """Seven joined VMs (names out of order), two others, one joined VM in another zone."""
    for n in (5, 1, 7, 3, 2, 6, 4):
        gce.emulator.seed_instance(ZONE, f"joined-{n}", labels={"mesh": "join"})
    gce.emulator.seed_instance(ZONE, "plain", labels={"team": "a"})
    gce.emulator.seed_instance(ZONE, "other", labels={"mesh": "leave"})
    gce.emulator.seed_instance(OTHER_ZONE, "joined-b", labels={"mesh": "join"})
    return gce


JOINED = [f"joined-{n}" for n in range(1, 8)]


@pytest.mark.parametrize("filter_, expected", [
    ("labels.mesh=join", JOINED),
    ('labels.mesh = "join"', JOINED),
    ("labels.mesh:*", JOINED + ["other"]),
    ('(labels.mesh = "join") (status = "RUNNING")', JOINED),
    ("(labels.mesh = join) AND (name != joined-3)", [n for n in JOINED if n != "joined-3"]),
    ('name = "plain"', ["plain"]),
    ("name != plain", sorted(JOINED + ["other"])),
    ("status = RUNNING", sorted(JOINED + ["other", "plain"])),
    ("labels.absent:*", []),
    ("", sorted(JOINED + ["other", "plain"])),
])
def test_list_filters(fleet, filter_, expected):
    assert list_names(fleet, filter_) == expected


def test_list_pages_in_name_order(fleet):
    request = compute_v1.ListInstancesRequest(project=fleet.project, zone=ZONE, filter="labels.mesh=join",
                                              max_results=3)
    pager = fleet.instances.list(request=request)
    pages = [[i.name for i in page.items] for page in pager.pages]
    assert pages == [JOINED[:3], JOINED[3:6], JOINED[6:]]


@pytest.mark.parametrize("filter_", ["labels.mesh = join OR name = x", "(labels.mesh = join", "cpu > 2", "foo = bar"])
def test_unsupported_filters_are_rejected(fleet, filter_):
    with pytest.raises(exceptions.BadRequest):
        list_names(fleet, filter_)


def test_aggregated_list_filters_and_pages_across_zones(fleet):
    request = compute_v1.AggregatedListInstancesRequest(project=fleet.project, filter="labels.mesh=join", max_results=3)
    pages = list(fleet.instances.aggregated_list(request=request).pages)
    # Map order within a page is not preserved by the proto map, so compare each page sorted.
    found = [sorted((scope, i.name) for scope, scoped in page.items.items() for i in scoped.instances)
             for page in pages]
    everything = [(f"zones/{ZONE}", n) for n in JOINED] + [(f"zones/{OTHER_ZONE}", "joined-b")]
    assert found == [everything[:3], everything[3:6], everything[6:]]
    # Zones without results on a page carry GCE's warning instead of instances.
    first = pages[0].items
    assert first[f"zones/{OTHER_ZONE}"].warning.code == "NO_RESULTS_ON_PAGE"
    assert not first[f"zones/{OTHER_ZONE}"].instances
    assert "zones/us-central1-f" in first


def test_max_results_over_500_is_rejected(fleet):
    with pytest.raises(exceptions.BadRequest):
        list_names(fleet, max_results=501)


# ---- audit entries ----------------------------------------------------------------------------------

def test_insert_set_labels_and_delete_log_first_and_last_entries(gce):
    insert(gce, "vm-1")
    vm = get(gce, "vm-1")
    request = compute_v1.InstancesSetLabelsRequest(labels={"mesh": "join"}, label_fingerprint=vm.label_fingerprint)
    # Each operation's `last` entry is written when it finishes: wait for each, in order.
    for call in (lambda: gce.instances.set_labels_unary(project=gce.project, zone=ZONE, instance="vm-1",
                                                        instances_set_labels_request_resource=request),
                 lambda: gce.instances.set_metadata_unary(project=gce.project, zone=ZONE, instance="vm-1",
                                                          metadata_resource=compute_v1.Metadata(
                                                              fingerprint=vm.metadata.fingerprint)),
                 lambda: gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="vm-1")):
        gce.operations.wait(project=gce.project, zone=ZONE, operation=call().name)

    methods = [(e["protoPayload"]["methodName"], "first" if e["operation"].get("first") else "last")
               for e in gce.events]
    assert methods == [
        ("v1.compute.instances.insert", "first"), ("v1.compute.instances.insert", "last"),
        ("v1.compute.instances.setLabels", "first"), ("v1.compute.instances.setLabels", "last"),
        ("v1.compute.instances.delete", "first"), ("v1.compute.instances.delete", "last"),
    ]
    for entry in gce.events:
        payload = entry["protoPayload"]
        assert payload["@type"] == "type.googleapis.com/google.cloud.audit.AuditLog"
        assert payload["serviceName"] == "compute.googleapis.com"
        assert payload["resourceName"] == f"projects/{gce.project}/zones/{ZONE}/instances/vm-1"
        assert payload["authenticationInfo"]["principalEmail"]
        assert entry["resource"] == {"type": "gce_instance",
                                     "labels": {"instance_id": str(vm.id), "project_id": gce.project, "zone": ZONE}}
        assert entry["severity"] == "NOTICE" and entry["operation"]["producer"] == "compute.googleapis.com"
        assert entry["logName"] == f"projects/{gce.project}/logs/cloudaudit.googleapis.com%2Factivity"
    first, last = gce.events[:2]
    assert first["operation"]["id"] == last["operation"]["id"]
    assert first["protoPayload"]["request"] == {"@type": "type.googleapis.com/compute.instances.insert"}
    assert first["protoPayload"]["response"]["status"] == "RUNNING"
    assert "labels" not in str(first["protoPayload"]["request"])


def test_no_event_header_drops_the_entries_and_prefix_header_sets_the_version(gce):
    insert(gce, "vm-1", headers=[("x-sandbox-no-event", "1")])
    assert gce.events == []
    insert(gce, "vm-2", headers=[("x-sandbox-method-prefix", "beta")])
    assert [e["protoPayload"]["methodName"] for e in gce.events] == ["beta.compute.instances.insert"] * 2


def test_principal_is_whoever_held_the_token(gce):
    """The audit entry names the token's account (here an owner other than the sandbox's operator)."""
    gce.world.iam.bindings.append(Binding(f"projects/{gce.project}", "roles/owner", "user:alice@example.com"))
    token = gce.world.issue_token("alice@example.com", [CLOUD_PLATFORM])
    alice_instances, _ = make_clients(gce.url, token)
    alice_instances.insert_unary(project=gce.project, zone=ZONE, instance_resource=compute_v1.Instance(name="vm-1"))
    assert gce.events[0]["protoPayload"]["authenticationInfo"]["principalEmail"] == "alice@example.com"


def test_audit_entries_are_published_outside_the_world_lock(gce):
    """A sink whose subscriber reads the VM from another thread must not deadlock the emulator."""
    seen = []

    def publish(entry):
        reader = threading.Thread(target=lambda: seen.append(gce.emulator.instance(ZONE, "vm-1")))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive()

    gce.world.publish_audit = publish
    insert(gce, "vm-1")
    assert len(seen) == 2 and seen[0]["name"] == "vm-1"


# ---- authentication and faults ----------------------------------------------------------------------

def test_requests_without_a_valid_token_are_unauthenticated(gce):
    answer = requests.get(f"{gce.url}/compute/v1/projects/{gce.project}/zones/{ZONE}/instances", timeout=5)
    assert answer.status_code == 401 and answer.json()["error"]["status"] == "UNAUTHENTICATED"
    # google-auth answers a 401 by refreshing, which a bare access token cannot do.
    stranger, _ = make_clients(gce.url, "ya29.not-a-sandbox-token")
    with pytest.raises(RefreshError):
        stranger.get(project=gce.project, zone=ZONE, instance="vm-1")


def test_other_projects_are_refused_before_any_lookup(gce):
    """IAM comes first: the operator holds nothing in another project, so Compute answers 403, not 404."""
    with pytest.raises(exceptions.Forbidden, match="Required 'compute.instances.get' permission for "
                                                   "'projects/someone-else/zones/us-central1-a/instances/vm-1'"):
        gce.instances.get(project="someone-else", zone=ZONE, instance="vm-1")


def test_fail_next_injects_statuses_then_recovers(fleet):
    fleet.emulator.fail_next("instances.aggregatedList", 503, count=2)
    request = compute_v1.AggregatedListInstancesRequest(project=fleet.project)
    for _ in range(2):
        with pytest.raises(exceptions.ServiceUnavailable):
            list(fleet.instances.aggregated_list(request=request, retry=None))
    assert len([i for _, scoped in fleet.instances.aggregated_list(request=request) for i in scoped.instances]) == 10
