"""Several projects in one sandbox (issue 16): each project's Compute is its own (VMs, number, default
account, common metadata, quotas), one endpoint routes by project, IAM follows deploy/terraform per
project (var.vm_projects), and each project's audit entries reach the events topic only through a
sink deploy/terraform makes in that project. Through the unmodified client libraries."""

from __future__ import annotations

import pytest
from google.api_core import exceptions
from google.cloud import compute_v1
from google.oauth2.credentials import Credentials

from meshjoin.adapters.compute import ComputeAdapter
from meshjoin.settings import Settings
from meshjoin_sandbox.compute import ComputeEmulator, ComputeProjects
from meshjoin_sandbox.config import DEFAULT_PROJECTS, sandbox_terraform_vars
from meshjoin_sandbox.metadata import MetadataEmulator
from meshjoin_sandbox.server import sink_routes
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import CLOUD_PLATFORM, World

HOST, SECOND = list(DEFAULT_PROJECTS)
THIRD = "meshjoin-sandbox-3"
ZONE = "us-central1-a"
ORDERS = f"orders@{HOST}.iam.gserviceaccount.com"
BILLING = f"billing@{SECOND}.iam.gserviceaccount.com"
CLUSTER = f"projects/{HOST}/locations/us-central1/clusters/mesh"


def variables(vm_projects: list[str]) -> dict:
    tf = sandbox_terraform_vars(HOST, "us-central1", CLUSTER, f"meshjoin-functions@{HOST}.iam.gserviceaccount.com")
    tf["identity_bindings"] = tf["identity_bindings"] + [
        {"gsa": BILLING, "namespace": "apps", "serviceAccount": "billing", "apps": ["billing"]}]
    return {**tf, "vm_projects": vm_projects}


@pytest.fixture
def world_of():
    servers = []

    def build(vm_projects: list[str]):
        world = World(projects={**DEFAULT_PROJECTS, THIRD: "345678901234"}, terraform_vars=variables(vm_projects))
        computes = {p: ComputeEmulator(world, subnet=f"10.{200 + i}.0.0/20", project=p)
                    for i, p in enumerate(world.projects)}
        server = serve(ComputeProjects(computes, HOST).app, "127.0.0.1", 0, name="compute")
        servers.append(server)
        for project, compute in computes.items():
            compute.seed_instance(ZONE, "vm-1", labels={"mesh": "join"},
                                  service_account=ORDERS if project == HOST else BILLING)
        return world, computes, f"http://127.0.0.1:{server.server_port}"

    yield build
    for server in servers:
        server.shutdown()


def client(world: World, url: str, email: str) -> compute_v1.InstancesClient:
    return compute_v1.InstancesClient(transport="rest", client_options={"api_endpoint": url},
                                      credentials=Credentials(world.issue_token(email, [CLOUD_PLATFORM])))


def test_each_project_has_its_own_vms_number_and_default_account(world_of):
    world, computes, url = world_of([SECOND])
    operator = client(world, url, world.operator_email)
    for project in (HOST, SECOND, THIRD):
        vm = operator.get(project=project, zone=ZONE, instance="vm-1")
        assert vm.self_link.endswith(f"/projects/{project}/zones/{ZONE}/instances/vm-1")
    ids = {operator.get(project=p, zone=ZONE, instance="vm-1").id for p in (HOST, SECOND)}
    assert len(ids) == 2, "two VMs of the same name and zone in two projects are two VMs"
    addresses = {computes[p].instance(ZONE, "vm-1")["networkInterfaces"][0]["networkIP"] for p in computes}
    assert len(addresses) == 3, "separate subnetworks: no address is used twice in the mesh"
    created = operator.insert_unary(project=SECOND, zone=ZONE, instance_resource=compute_v1.Instance(
        name="plain", network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")]))
    assert created.target_link.endswith(f"/projects/{SECOND}/zones/{ZONE}/instances/plain")
    account = computes[SECOND].instance(ZONE, "plain")["serviceAccounts"][0]["email"]
    assert account == f"{DEFAULT_PROJECTS[SECOND]}-compute@developer.gserviceaccount.com"
    assert computes[HOST].instance(ZONE, "plain") is None


def test_the_functions_may_act_in_the_vm_projects_terraform_lists_and_nowhere_else(world_of):
    world, computes, url = world_of([SECOND])
    functions = client(world, url, world.service_account)
    for project in (HOST, SECOND):
        assert functions.get(project=project, zone=ZONE, instance="vm-1").name == "vm-1"
    with pytest.raises(exceptions.Forbidden, match="compute.instances.get"):
        functions.get(project=THIRD, zone=ZONE, instance="vm-1")
    # Terraform without vm_projects: the second project is as foreign as the third.
    world, computes, url = world_of([])
    with pytest.raises(exceptions.Forbidden, match="compute.instances.get"):
        client(world, url, world.service_account).get(project=SECOND, zone=ZONE, instance="vm-1")


def test_the_product_lists_and_writes_vms_of_the_second_project(world_of):
    """ComputeAdapter as the functions use it: list_vms(project=), get_vm, set_metadata (actAs on the
    VM's own account, in the account's project), project_metadata(project)."""
    world, computes, url = world_of([SECOND])
    settings = Settings(project=HOST, cluster=CLUSTER, compute_endpoint=url, vm_projects=(SECOND,))
    adapter = ComputeAdapter(settings, Credentials(world.issue_token(world.service_account, [CLOUD_PLATFORM])))
    listed = {vm.key.project: vm for p in settings.vm_projects for vm in adapter.list_vms("labels.mesh=join", project=p)}
    assert set(listed) == {HOST, SECOND} and listed[SECOND].service_account == BILLING
    vm = adapter.get_vm(listed[SECOND].key)
    adapter.set_metadata(vm, {"meshjoin-status": '{"state": "waiting"}'})
    assert {i["key"] for i in computes[SECOND].instance(ZONE, "vm-1")["metadata"]["items"]} == {"meshjoin-status"}
    assert computes[HOST].instance(ZONE, "vm-1")["metadata"]["items"] == []
    assert adapter.project_metadata(SECOND) == {}


def test_the_metadata_server_of_a_second_project_vm_speaks_for_that_project(world_of):
    world, computes, url = world_of([SECOND])
    tree = MetadataEmulator(world, instance=(ZONE, "vm-1"), compute=computes[SECOND])._tree()
    assert tree["project"]["project-id"] == SECOND
    assert tree["project"]["numeric-project-id"] == DEFAULT_PROJECTS[SECOND]
    assert tree["instance"]["service-accounts"]["default"]["email"] == BILLING
    assert tree["instance"]["hostname"] == f"vm-1.{ZONE}.c.{SECOND}.internal"


def test_audit_entries_reach_the_events_topic_only_from_projects_with_a_sink():
    routes = sink_routes(variables([SECOND]), DEFAULT_PROJECTS[HOST], "meshjoin-events")
    assert set(routes) == {HOST, SECOND}
    assert routes[SECOND] == routes[HOST] and "v1.compute.instances.setLabels" in routes[SECOND]
    assert set(sink_routes(variables([]), DEFAULT_PROJECTS[HOST], "meshjoin-events")) == {HOST}


def test_quotas_are_per_project(world_of):
    """Each project's own per-minute quota: the second project's gets do not count against the host's."""
    world, computes, url = world_of([SECOND])
    operator = client(world, url, world.operator_email)
    for _ in range(3):
        operator.get(project=SECOND, zone=ZONE, instance="vm-1")
    operator.get(project=HOST, zone=ZONE, instance="vm-1")
    used = {p: {k: v[1] for k, v in computes[p].quotas._counts.items()} for p in (HOST, SECOND)}
    assert used[SECOND] == {(DEFAULT_PROJECTS[SECOND], "reads"): 3}
    assert used[HOST] == {(DEFAULT_PROJECTS[HOST], "reads"): 1}
