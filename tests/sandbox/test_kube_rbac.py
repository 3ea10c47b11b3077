"""GKE authentication and authorization in the Kubernetes emulator, through the real `kubernetes`
client and real `kubectl`: who a Google token is (email or numeric id), RBAC from the objects
kubernetes.tf creates, the IAM fallback, SelfSubjectAccessReview, and kubectl's protobuf and
OpenAPI paths (`create namespace`, `auth can-i`, `explain`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from meshjoin_sandbox.crds import istio_crds_path
from meshjoin_sandbox.kube import KubeEmulator
from meshjoin_sandbox.kube_rbac import (
    OPERATOR_BINDING, Attributes, KubeUser, iam_permission, rule_allows, terraform_rbac_objects,
)
from meshjoin_sandbox.terraform import default_terraform_dir
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import CLOUD_PLATFORM, USERINFO_EMAIL, World, unique_id_of

from .test_kube import _api_client, _write_tls, status_of, workload_entry

CRD_PATH = str(istio_crds_path())
GROUP = "networking.istio.io"
ALLOWED_NAMESPACES = tuple(World().default_terraform_vars()["allowed_namespaces"])  # default, apps, payments
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None and not os.environ.get("CI"), reason="kubectl is not installed")


# --- a cluster as `sandbox up` leaves it: app namespaces, then kubernetes.tf applied -------------------


def _start(world: World, directory: Path, terraform_dir: Path | None = None, operator_admin: bool = True):
    _, cert, key = _write_tls(directory)
    emulator = KubeEmulator(world, CRD_PATH)
    for namespace in set(ALLOWED_NAMESPACES) - {"default"}:
        emulator.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    emulator.seed_terraform_rbac(directory=terraform_dir)
    if not operator_admin:
        emulator.delete_object("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", OPERATOR_BINDING)
    server = serve(emulator.app, "127.0.0.1", 0, ssl_context=(str(cert), str(key)), name="kube")
    return emulator, server, f"https://127.0.0.1:{server.port}", directory / "ca.pem"


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory):
    emulator, server, endpoint, ca = _start(world, tmp_path_factory.mktemp("rbac-tls"))
    yield emulator, endpoint, ca
    server.shutdown()


@pytest.fixture(scope="module")
def connect(cluster):
    """A kubernetes ApiClient for a bearer token."""
    _, endpoint, ca = cluster
    return lambda token: _api_client(endpoint, ca, token)


@pytest.fixture(scope="module")
def functions_email(world) -> str:
    return world.functions_email


@pytest.fixture(scope="module")
def with_email(world, connect) -> client.ApiClient:
    """The functions' token as gcloud's credential helper asks for it: cloud-platform + userinfo.email."""
    return connect(world.issue_token(world.functions_email, [CLOUD_PLATFORM, USERINFO_EMAIL]))


@pytest.fixture(scope="module")
def without_email(world, connect) -> client.ApiClient:
    """The functions' token with cloud-platform only (what the product asks for today: defect 1)."""
    return connect(world.issue_token(world.functions_email, [CLOUD_PLATFORM]))


def forbidden(call) -> dict:
    with pytest.raises(ApiException) as err:
        call()
    assert err.value.status == 403, err.value.body
    return status_of(err.value)


def create_we(api: client.ApiClient, namespace: str, name: str | None = None) -> dict:
    body = workload_entry(name or "vm-" + uuid.uuid4().hex[:6])
    return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, "v1", namespace, "workloadentries", body)


# --- authentication -------------------------------------------------------------------------------------


def test_gke_names_a_google_token_by_email_only_with_the_userinfo_email_scope(world):
    email = world.functions_email
    with_scope = world.principal_of(world.issue_token(email, [CLOUD_PLATFORM, USERINFO_EMAIL]))
    without = world.principal_of(world.issue_token(email, [CLOUD_PLATFORM]))
    assert with_scope.kube_username == email
    assert without.kube_username == unique_id_of(email) and without.kube_username.isdigit()


def test_a_token_without_userinfo_email_is_refused_where_rbac_names_the_account_by_email(with_email, without_email,
                                                                                         world):
    assert create_we(with_email, "apps")["metadata"]["namespace"] == "apps"

    status = forbidden(lambda: create_we(without_email, "apps", "vm-by-id"))
    user = unique_id_of(world.functions_email)
    assert status == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": f'workloadentries.networking.istio.io is forbidden: User "{user}" cannot create resource '
                   '"workloadentries" in API group "networking.istio.io" in the namespace "apps": requires one of '
                   '["container.thirdPartyObjects.create"] permission(s) in Cloud IAM or a Kubernetes RBAC role '
                   'with verb "create" for resource "workloadentries".',
        "details": {"group": "networking.istio.io", "kind": "workloadentries"},
    }


# --- RBAC as kubernetes.tf grants it ------------------------------------------------------------------------


def test_the_writer_role_is_bound_only_in_the_allowed_namespaces(with_email, functions_email):
    assert "apps" in ALLOWED_NAMESPACES and "kube-system" not in ALLOWED_NAMESPACES
    for namespace in ALLOWED_NAMESPACES:
        create_we(with_email, namespace)
    core = client.CoreV1Api(with_email)
    service = client.V1Service(metadata=client.V1ObjectMeta(name="web"),
                               spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]))
    assert core.create_namespaced_service("apps", service).spec.cluster_ip
    assert core.read_namespaced_service("web", "apps").metadata.name == "web"

    status = forbidden(lambda: create_we(with_email, "kube-system"))
    assert status["message"].startswith(
        f'workloadentries.networking.istio.io is forbidden: User "{functions_email}" cannot create resource '
        '"workloadentries" in API group "networking.istio.io" in the namespace "kube-system"')
    # kubernetes.tf grants get and create on ServiceAccounts, never delete, and no patch anywhere.
    status = forbidden(lambda: core.delete_namespaced_service_account("default", "apps"))
    assert status["details"] == {"name": "default", "kind": "serviceaccounts"}
    assert status["message"] == (
        f'serviceaccounts "default" is forbidden: User "{functions_email}" cannot delete resource "serviceaccounts" '
        'in API group "" in the namespace "apps": requires one of ["container.serviceAccounts.delete"] '
        'permission(s) in Cloud IAM or a Kubernetes RBAC role with verb "delete" for resource "serviceaccounts".')
    forbidden(lambda: core.patch_namespaced_service("web", "apps", {"metadata": {"labels": {"a": "b"}}}))


def test_the_reader_role_reads_across_the_cluster_but_writes_nothing(with_email, functions_email, connect, world):
    custom, core = client.CustomObjectsApi(with_email), client.CoreV1Api(with_email)
    client.CoreV1Api(connect(world.admin_token)).create_namespaced_service("kube-system", client.V1Service(
        metadata=client.V1ObjectMeta(name="kube-dns"), spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=53)])))
    create_we(with_email, "payments", "listed-everywhere")
    listing = custom.list_cluster_custom_object(GROUP, "v1", "workloadentries")
    assert "listed-everywhere" in {item["metadata"]["name"] for item in listing["items"]}
    assert any(s.metadata.name == "kube-dns" for s in core.list_service_for_all_namespaces().items)
    # list on Services cluster-wide, but get only where the writer role is bound.
    status = forbidden(lambda: core.read_namespaced_service("kube-dns", "kube-system"))
    assert 'cannot get resource "services" in API group "" in the namespace "kube-system"' in status["message"]
    status = forbidden(lambda: core.list_namespace())
    assert status["message"].startswith(
        f'namespaces is forbidden: User "{functions_email}" cannot list resource "namespaces" in API group "" '
        "at the cluster scope")


def test_discovery_is_open_to_every_authenticated_user_and_closed_to_strangers(world, connect):
    stranger = connect(world.issue_token("stranger@example.com", [CLOUD_PLATFORM, USERINFO_EMAIL]))
    assert client.VersionApi(stranger).get_code().major == "1"
    assert any(g.name == GROUP for g in client.ApisApi(stranger).get_api_versions().groups)
    status = forbidden(lambda: client.CoreV1Api(stranger).list_namespaced_service("apps"))
    assert 'User "stranger@example.com" cannot list resource "services"' in status["message"]


def test_a_verb_removed_from_kubernetes_tf_makes_the_products_call_403(world, tmp_path):
    """One source of truth: the sandbox's RBAC is what deploy/terraform creates."""
    module = tmp_path / "terraform"
    shutil.copytree(default_terraform_dir(), module)
    tf = module / "kubernetes.tf"
    text = tf.read_text()
    granted = 'verbs      = ["get", "list", "create", "update", "delete"]'
    assert text.count(granted) == 1, "the writer rule for WorkloadEntries changed: update this test"
    tf.write_text(text.replace(granted, 'verbs      = ["get", "list", "update", "delete"]'))

    _, server, endpoint, ca = _start(world, tmp_path, terraform_dir=module)
    try:
        token = world.issue_token(world.functions_email, [CLOUD_PLATFORM, USERINFO_EMAIL])
        api = _api_client(endpoint, ca, token)
        status = forbidden(lambda: create_we(api, "apps"))  # the POST the product's adapter sends
        assert 'cannot create resource "workloadentries"' in status["message"]
        # ...while what the module still grants keeps working.
        assert client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, "v1", "apps", "workloadentries")
    finally:
        server.shutdown()


def test_seeded_objects_are_those_of_kubernetes_tf(cluster, world):
    emulator, _, _ = cluster
    expected = terraform_rbac_objects(world.default_terraform_vars(), world.project_number)
    kinds = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in expected}
    assert kinds == {
        ("ClusterRole", "", "meshjoin-writer"), ("ClusterRole", "", "meshjoin-reader"),
        ("RoleBinding", "apps", "meshjoin-writer"), ("RoleBinding", "payments", "meshjoin-writer"),
        ("RoleBinding", "default", "meshjoin-writer"),
        ("ClusterRoleBinding", "", "meshjoin-reader"),
    }
    stored = emulator._objects["rolebindings.rbac.authorization.k8s.io"][("apps", "meshjoin-writer")]
    assert stored["subjects"] == [{"kind": "User", "name": world.functions_email,
                                   "apiGroup": "rbac.authorization.k8s.io"}]
    assert stored["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                 "name": "meshjoin-writer"}


# --- IAM fallback ---------------------------------------------------------------------------------------------


def test_iam_container_permissions_are_the_fallback_when_rbac_is_silent(world, tmp_path):
    """The operator without a cluster-admin binding: still allowed through IAM (project owner), as on GKE;
    the functions' account holds only container.clusterViewer in IAM, which grants no objects."""
    _, server, endpoint, ca = _start(world, tmp_path, operator_admin=False)
    try:
        operator = _api_client(endpoint, ca, world.admin_token)
        name = "via-iam-" + uuid.uuid4().hex[:6]
        client.CoreV1Api(operator).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        review = client.AuthorizationV1Api(operator).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(verb="delete", resource="namespaces", name=name))))
        assert review.status.allowed is True
        assert review.status.reason == 'allowed by Cloud IAM permission "container.namespaces.delete"'

        functions = _api_client(endpoint, ca, world.issue_token(world.functions_email, [CLOUD_PLATFORM]))
        status = forbidden(lambda: client.CoreV1Api(functions).list_namespace())
        assert '["container.namespaces.list"]' in status["message"]
    finally:
        server.shutdown()


@pytest.mark.parametrize("group, resource, verb, subresource, permission", [
    ("", "services", "create", "", "container.services.create"),
    ("", "serviceaccounts", "get", "", "container.serviceAccounts.get"),
    ("", "services", "patch", "", "container.services.update"),
    ("", "services", "update", "status", "container.services.updateStatus"),
    ("networking.istio.io", "workloadentries", "delete", "", "container.thirdPartyObjects.delete"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create", "", "container.clusterRoleBindings.create"),
])
def test_iam_permission_names(group, resource, verb, subresource, permission):
    attrs = Attributes(KubeUser("u"), verb, api_group=group, resource=resource, subresource=subresource)
    assert iam_permission(attrs) == permission


# --- RBAC semantics -------------------------------------------------------------------------------------------

RULE = {"apiGroups": [""], "resources": ["services", "services/status"], "verbs": ["get", "update"],
        "resourceNames": ["web"]}


@pytest.mark.parametrize("rule, attrs, allowed", [
    (RULE, dict(verb="get", resource="services", name="web"), True),
    (RULE, dict(verb="get", resource="services", name="db"), False),
    (RULE, dict(verb="list", resource="services"), False),
    (RULE, dict(verb="update", resource="services", subresource="status", name="web"), True),
    (RULE, dict(verb="get", api_group="apps", resource="services", name="web"), False),
    ({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]},
     dict(verb="patch", api_group="x.io", resource="things", subresource="status", name="a"), True),
    ({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]},
     dict(verb="patch", api_group="x.io", resource="things", name="a"), False),
    ({"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}, dict(verb="get", resource_request=False, path="/apis/x"), True),
    ({"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}, dict(verb="get", resource_request=False, path="/api"), False),
    ({"nonResourceURLs": ["/version"], "verbs": ["get"]}, dict(verb="post", resource_request=False, path="/version"),
     False),
])
def test_rule_matching(rule, attrs, allowed):
    assert rule_allows(rule, Attributes(KubeUser("u"), **attrs)) is allowed


def test_roles_and_bindings_created_through_the_api_grant_exactly_their_rules(world, connect):
    admin = client.RbacAuthorizationV1Api(connect(world.admin_token))
    alice = "alice-" + uuid.uuid4().hex[:6] + "@example.com"
    role = client.V1Role(metadata=client.V1ObjectMeta(name="web-editor"), rules=[client.V1PolicyRule(**{
        "api_groups": [""], "resources": ["services", "services/status"], "verbs": ["get", "update"],
        "resource_names": ["web-" + alice[:12]]})])
    namespace = "payments"
    try:
        admin.create_namespaced_role(namespace, role)
    except ApiException as exc:
        assert exc.status == 409
    admin.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name=alice.split("@")[0]),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="web-editor"),
        subjects=[client.RbacV1Subject(kind="User", name=alice, api_group="rbac.authorization.k8s.io")]))
    operator_core = client.CoreV1Api(connect(world.admin_token))
    for name in ("web-" + alice[:12], "db-" + alice[:12]):
        operator_core.create_namespaced_service(namespace, client.V1Service(
            metadata=client.V1ObjectMeta(name=name), spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)])))

    core = client.CoreV1Api(connect(world.issue_token(alice, [CLOUD_PLATFORM, USERINFO_EMAIL])))
    web = core.read_namespaced_service("web-" + alice[:12], namespace)
    core.replace_namespaced_service_status(web.metadata.name, namespace, web)
    status = forbidden(lambda: core.read_namespaced_service("db-" + alice[:12], namespace))
    assert status["message"].startswith(f'services "db-{alice[:12]}" is forbidden: User "{alice}" cannot get')
    forbidden(lambda: core.list_namespaced_service(namespace))  # resourceNames never match a list
    forbidden(lambda: core.read_namespaced_service("web-" + alice[:12], "apps"))  # bound in payments only


def test_rbac_objects_are_validated(world, connect):
    admin = client.RbacAuthorizationV1Api(connect(world.admin_token))
    with pytest.raises(ApiException) as err:
        admin.create_cluster_role(client.V1ClusterRole(metadata=client.V1ObjectMeta(name="no-verbs"),
                                                       rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"],
                                                                                  verbs=[])]))
    assert err.value.status == 422 and "rules[0].verbs" in status_of(err.value)["message"]
    name = "rr-" + uuid.uuid4().hex[:6]
    binding = client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name=name),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="view"),
        subjects=[client.RbacV1Subject(kind="User", name="x@example.com", api_group="rbac.authorization.k8s.io")])
    admin.create_cluster_role_binding(binding)
    binding.role_ref.name = "cluster-admin"
    with pytest.raises(ApiException) as err:
        admin.replace_cluster_role_binding(name, binding)
    assert err.value.status == 422 and "cannot change roleRef" in status_of(err.value)["message"]


# --- SelfSubjectAccessReview -----------------------------------------------------------------------------------


def review(api: client.ApiClient, **attrs) -> client.V1SubjectAccessReviewStatus:
    spec = client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(**attrs))
    return client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=spec)).status


def test_self_subject_access_review_answers_for_the_caller(with_email, without_email):
    allowed = review(with_email, namespace="apps", verb="create", group=GROUP, resource="workloadentries")
    assert allowed.allowed is True
    assert allowed.reason.startswith('RBAC: allowed by RoleBinding "meshjoin-writer" of ClusterRole "meshjoin-writer"')
    denied = review(with_email, namespace="kube-system", verb="create", group=GROUP, resource="workloadentries")
    assert denied.allowed is False and "container.thirdPartyObjects.create" in denied.reason
    assert review(without_email, namespace="apps", verb="create", group=GROUP, resource="workloadentries").allowed is False
    assert review(with_email, verb="list", group=GROUP, resource="workloadentries").allowed is True  # all namespaces


# --- real kubectl ----------------------------------------------------------------------------------------------


@pytest.fixture
def kubectl(cluster, world, tmp_path):
    """kubectl with a plain kubeconfig for a token: kubectl(token)(*args) -> CompletedProcess."""
    _, endpoint, ca = cluster

    def as_token(token: str):
        kubeconfig = tmp_path / f"kubeconfig-{uuid.uuid4().hex[:6]}"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "sandbox", "cluster": {"server": endpoint, "certificate-authority": str(ca)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "u", "namespace": "default"}}],
            "current-context": "sandbox",
        }))

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                                  text=True, timeout=60, env={"HOME": str(tmp_path)})
        return run

    return as_token


@needs_kubectl
def test_kubectl_auth_can_i(kubectl, world):
    functions = kubectl(world.issue_token(world.functions_email, [CLOUD_PLATFORM, USERINFO_EMAIL]))
    done = functions("auth", "can-i", "create", "workloadentries", "-n", "apps")
    assert (done.returncode, done.stdout.strip()) == (0, "yes"), done.stderr
    done = functions("auth", "can-i", "create", "workloadentries", "-n", "kube-system")
    assert done.returncode == 1 and done.stdout.startswith("no"), done.stderr
    done = functions("auth", "can-i", "delete", "serviceaccounts", "-n", "apps")
    assert done.returncode == 1 and done.stdout.startswith("no"), done.stderr
    by_id = kubectl(world.issue_token(world.functions_email, [CLOUD_PLATFORM]))
    done = by_id("auth", "can-i", "create", "workloadentries", "-n", "apps")
    assert done.returncode == 1 and done.stdout.startswith("no"), done.stderr
    done = kubectl(world.admin_token)("auth", "can-i", "delete", "namespaces")
    assert (done.returncode, done.stdout.strip()) == (0, "yes"), done.stderr


@needs_kubectl
def test_kubectl_create_namespace_and_rbac_objects_in_protobuf(kubectl, world):
    admin = kubectl(world.admin_token)
    name = "made-" + uuid.uuid4().hex[:6]
    done = admin("create", "namespace", name)
    assert done.returncode == 0 and f"namespace/{name} created" in done.stdout, done.stderr
    done = admin("create", "rolebinding", "bob-view-we", "--clusterrole=meshjoin-reader", "--user=bob@example.com",
                 "-n", name)
    assert done.returncode == 0, done.stderr
    bob = kubectl(world.issue_token("bob@example.com", [CLOUD_PLATFORM, USERINFO_EMAIL]))
    assert bob("auth", "can-i", "list", "workloadentries", "-n", name).stdout.strip() == "yes"
    assert bob("auth", "can-i", "list", "workloadentries", "-n", "apps").stdout.startswith("no")
    # The functions' account may not create namespaces: the exact Forbidden from the server.
    done = kubectl(world.issue_token(world.functions_email, [CLOUD_PLATFORM, USERINFO_EMAIL]))(
        "create", "namespace", "not-mine")
    assert done.returncode != 0
    assert (f'Error from server (Forbidden): namespaces is forbidden: User "{world.functions_email}" cannot create '
            'resource "namespaces" in API group "" at the cluster scope') in done.stderr


@needs_kubectl
def test_kubectl_apply_of_rbac_objects(kubectl, world):
    admin = kubectl(world.admin_token)
    carol = "carol@example.com"
    manifest = yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "we-reader"},
         "rules": [{"apiGroups": [GROUP], "resources": ["workloadentries"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "carol"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "we-reader"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": carol}]},
    ])
    done = admin("apply", "-f", "-", stdin=manifest)
    assert done.returncode == 0 and "clusterrole.rbac.authorization.k8s.io/we-reader created" in done.stdout, done.stderr
    as_carol = kubectl(world.issue_token(carol, [CLOUD_PLATFORM, USERINFO_EMAIL]))
    assert as_carol("get", "workloadentries", "-A").returncode == 0
    refused = as_carol("get", "services", "-A")
    assert refused.returncode != 0 and 'User "carol@example.com" cannot list resource "services"' in refused.stderr
    assert "we-reader" in admin("get", "clusterroles", "-o", "name").stdout


@needs_kubectl
def test_kubectl_explain_workloadentry(kubectl, world):
    admin = kubectl(world.admin_token)
    done = admin("explain", "workloadentry")
    assert done.returncode == 0, done.stderr
    assert "KIND:       WorkloadEntry" in done.stdout and "VERSION:    v1" in done.stdout
    assert "spec\t<Object> -required-" in done.stdout
    done = admin("explain", "workloadentry.spec")
    assert done.returncode == 0, done.stderr
    assert "Address associated with the network endpoint without the port." in done.stdout
    assert "serviceAccount\t<string>" in done.stdout
    done = admin("explain", "workloadentry.spec.ports")
    assert done.returncode == 0 and "map[string]integer" in done.stdout, done.stderr + done.stdout
    done = admin("explain", "namespace")
    assert done.returncode == 0 and "Namespace provides a scope for Names" in done.stdout, done.stderr
    json.loads(admin("get", "--raw", "/openapi/v3").stdout)  # the index kubectl reads first


@needs_kubectl
def test_kubectl_as_another_user_needs_the_impersonate_verb(kubectl, world):
    admin = kubectl(world.admin_token)  # cluster-admin: "*" covers impersonate
    done = admin("auth", "can-i", "create", "workloadentries", "-n", "apps", "--as", world.functions_email)
    assert (done.returncode, done.stdout.strip()) == (0, "yes"), done.stderr
    done = admin("auth", "can-i", "create", "workloadentries", "-n", "kube-system", "--as", world.functions_email)
    assert done.returncode == 1 and done.stdout.startswith("no"), done.stderr
    done = admin("get", "namespaces", "--as", world.functions_email)
    assert done.returncode != 0 and f'User "{world.functions_email}" cannot list resource "namespaces"' in done.stderr

    functions = kubectl(world.issue_token(world.functions_email, [CLOUD_PLATFORM, USERINFO_EMAIL]))
    done = functions("get", "workloadentries", "-n", "apps", "--as", world.operator_email)
    assert done.returncode != 0
    assert (f'users "{world.operator_email}" is forbidden: User "{world.functions_email}" cannot impersonate '
            'resource "users" in API group "" at the cluster scope') in done.stderr
