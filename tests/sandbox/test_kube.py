"""The Kubernetes API server emulator, driven over HTTPS by the real `kubernetes` client and `kubectl`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client
from kubernetes.client.rest import ApiException

from meshjoin_sandbox.crds import istio_crds_path
from meshjoin_sandbox.kube import KubeEmulator
from meshjoin_sandbox.kube_patch import json_patch, merge_patch
from meshjoin_sandbox.kube_schema import CelRules
from meshjoin_sandbox.kube_selectors import parse_selector, selector_matches
from meshjoin_sandbox.kube_protobuf import MAGIC, PROTOBUF_MEDIA_TYPE, UNKNOWN, encode_message, encode_object
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import World

CRD_PATH = str(istio_crds_path())
GROUP = "networking.istio.io"


# --- fixtures: a throw-away CA, the emulator served over HTTPS, clients --------------------------------


def _write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tls") / "ca.pem"


@pytest.fixture(scope="module")
def endpoint(world, ca_file) -> str:
    _, cert, key = _write_tls(ca_file.parent)
    server = serve(KubeEmulator(world, CRD_PATH).app, "127.0.0.1", 0, ssl_context=(str(cert), str(key)), name="kube")
    yield f"https://127.0.0.1:{server.port}"
    server.shutdown()


def _api_client(endpoint: str, ca_file: Path, token: str | None) -> client.ApiClient:
    config = client.Configuration(host=endpoint)
    config.ssl_ca_cert = str(ca_file)
    if token:
        config.api_key = {"authorization": "Bearer " + token}
    return client.ApiClient(config)


@pytest.fixture(scope="module")
def api(endpoint, ca_file, world) -> client.ApiClient:
    return _api_client(endpoint, ca_file, world.admin_token)


@pytest.fixture(scope="module")
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def custom(api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def ns(core) -> str:
    """A fresh namespace per test, so tests do not see each other's objects."""
    name = "t-" + uuid.uuid4().hex[:8]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


def workload_entry(name: str, labels: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"address": "10.128.0.7", "ports": {"http": 8080}, "serviceAccount": "vm", **spec},
    }


def create_we(custom, ns, body, version="v1"):
    return custom.create_namespaced_custom_object(GROUP, version, ns, "workloadentries", body)


def service(name: str, port: int = 80, labels: dict | None = None) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1ServiceSpec(selector={"app": name}, ports=[client.V1ServicePort(name="http", port=port)]),
    )


# --- authentication and discovery ----------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "not-a-sandbox-token"])
def test_requests_without_a_valid_token_get_401_status(endpoint, ca_file, token):
    core = client.CoreV1Api(_api_client(endpoint, ca_file, token))
    with pytest.raises(ApiException) as err:
        core.list_namespace()
    assert err.value.status == 401
    assert status_of(err.value) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


def test_the_functions_token_is_authenticated_and_then_authorized(endpoint, ca_file, world):
    """Known token: past authentication (no 401); then RBAC, which here grants it nothing on namespaces."""
    core = client.CoreV1Api(_api_client(endpoint, ca_file, world.sa_token))
    with pytest.raises(ApiException) as err:
        core.read_namespace("default")
    assert err.value.status == 403 and status_of(err.value)["reason"] == "Forbidden"
    assert client.VersionApi(_api_client(endpoint, ca_file, world.sa_token)).get_code().major == "1"


def test_discovery_documents(api):
    assert client.VersionApi(api).get_code().major == "1"
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    core_resources = {r.name: r for r in client.CoreV1Api(api).get_api_resources().resources}
    assert not core_resources["namespaces"].namespaced
    assert core_resources["services"].short_names == ["svc"]
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    istio = groups[GROUP]
    assert istio.preferred_version.version == "v1"
    assert [v.version for v in istio.versions] == ["v1", "v1beta1", "v1alpha3"]
    for version in ("v1", "v1beta1", "v1alpha3"):
        resources = client.CustomObjectsApi(api).get_api_resources(GROUP, version).resources
        assert {"workloadentries", "workloadgroups", "serviceentries"} <= {r.name for r in resources}


# --- core kinds ----------------------------------------------------------------------------------------


def test_seeded_namespaces_and_default_service_accounts(core):
    names = {n.metadata.name for n in core.list_namespace().items}
    assert {"default", "kube-system", "istio-system"} <= names
    istio = core.read_namespace("istio-system")
    assert istio.status.phase == "Active"
    assert istio.metadata.labels["kubernetes.io/metadata.name"] == "istio-system"
    assert core.read_namespaced_service_account("default", "istio-system").metadata.namespace == "istio-system"
    assert core.read_namespaced_service("kubernetes", "default").spec.cluster_ip == "10.96.0.1"


def test_namespace_create_duplicate_and_delete_with_contents(core):
    created = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="doomed")))
    assert created.metadata.uid and created.metadata.resource_version
    with pytest.raises(ApiException) as err:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="doomed")))
    assert err.value.status == 409 and status_of(err.value)["reason"] == "AlreadyExists"
    assert status_of(err.value)["message"] == 'namespaces "doomed" already exists'
    core.create_namespaced_service("doomed", service("web"))
    core.delete_namespace("doomed")
    for read in (lambda: core.read_namespace("doomed"), lambda: core.read_namespaced_service("web", "doomed")):
        with pytest.raises(ApiException) as err:
            read()
        assert err.value.status == 404


def test_service_create_get_replace_patch_delete(core, ns):
    svc, code, _ = core.create_namespaced_service_with_http_info(ns, service("web", labels={"app": "web"}))
    assert code == 201
    assert svc.metadata.namespace == ns and svc.metadata.generation == 1
    assert ipaddress.ip_address(svc.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/12")
    assert svc.spec.ports[0].protocol == "TCP" and svc.spec.ports[0].target_port == 80

    stale = svc.metadata.resource_version
    svc.spec.ports[0].port = 81
    replaced = core.replace_namespaced_service("web", ns, svc)
    assert replaced.spec.ports[0].port == 81 and replaced.metadata.generation == 2
    assert int(replaced.metadata.resource_version) > int(stale)
    assert replaced.spec.cluster_ip == svc.spec.cluster_ip

    with pytest.raises(ApiException) as err:
        core.replace_namespaced_service("web", ns, svc)  # still carries the stale resourceVersion
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(err.value)["message"]

    merged = core.patch_namespaced_service("web", ns, {"metadata": {"labels": {"tier": "front"}}},
                                           _content_type="application/merge-patch+json")
    assert merged.metadata.labels == {"app": "web", "tier": "front"}
    strategic = core.patch_namespaced_service("web", ns, {"metadata": {"annotations": {"a": "b"}}},
                                              _content_type="application/strategic-merge-patch+json")
    assert strategic.metadata.annotations == {"a": "b"}
    patched = core.patch_namespaced_service("web", ns, [{"op": "replace", "path": "/spec/ports/0/port", "value": 82}])
    assert patched.spec.ports[0].port == 82

    deleted = core.delete_namespaced_service("web", ns)
    assert deleted.metadata.name == "web"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("web", ns)
    assert err.value.status == 404
    assert status_of(err.value)["message"] == 'services "web" not found'
    with pytest.raises(ApiException) as err:
        core.delete_namespaced_service("web", ns)
    assert err.value.status == 404


def test_service_validation(core, ns):
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service(ns, service("web", port=70000))
    assert err.value.status == 422
    body = status_of(err.value)
    assert body["reason"] == "Invalid"
    assert body["message"].startswith('Service "web" is invalid: ')
    assert "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive" in body["message"]
    assert body["details"]["causes"][0]["field"] == "spec.ports[0].port"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service(ns, service("Not_A_Name"))
    assert err.value.status == 422 and "metadata.name" in status_of(err.value)["message"]
    created = core.create_namespaced_service(ns, service("web"))
    created.spec.cluster_ip = "10.96.99.99"
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_service("web", ns, created)
    assert err.value.status == 422 and "field is immutable" in status_of(err.value)["message"]


def test_create_in_a_missing_namespace_is_404(core, custom):
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service_account(
            "nowhere", client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="x")))
    assert err.value.status == 404 and status_of(err.value)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(ApiException) as err:
        create_we(custom, "nowhere", workload_entry("vm"))
    assert err.value.status == 404


def test_service_accounts_and_cluster_wide_service_list(core, ns):
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="vm")))
    assert {sa.metadata.name for sa in core.list_namespaced_service_account(ns).items} == {"default", "vm"}
    core.create_namespaced_service(ns, service("web"))
    everywhere = core.list_service_for_all_namespaces()
    found = {(s.metadata.namespace, s.metadata.name) for s in everywhere.items}
    assert {("default", "kubernetes"), (ns, "web")} <= found


def test_metadata_name_is_required_and_namespace_must_match(core, custom, ns):
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta()))
    assert err.value.status == 422
    assert "metadata.name: Required value" in status_of(err.value)["message"]
    body = workload_entry("vm")
    body["metadata"]["namespace"] = "default"
    with pytest.raises(ApiException) as err:
        create_we(custom, ns, body)
    assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"


def test_invalid_labels_are_refused(core, ns):
    sa = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="x", labels={"owner": "me@example.com"}))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service_account(ns, sa)
    assert err.value.status == 422 and "metadata.labels" in status_of(err.value)["message"]


# --- Istio kinds ---------------------------------------------------------------------------------------


def test_workload_entry_lifecycle(custom, ns):
    obj, code, _ = custom.create_namespaced_custom_object_with_http_info(
        GROUP, "v1", ns, "workloadentries", workload_entry("vm-1", {"app": "web"}))
    assert code == 201
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["uid"]
    assert obj["metadata"]["creationTimestamp"].endswith("Z")

    with pytest.raises(ApiException) as err:
        create_we(custom, ns, workload_entry("vm-1"))
    assert err.value.status == 409
    assert status_of(err.value)["message"] == 'workloadentries.networking.istio.io "vm-1" already exists'

    got = custom.get_namespaced_custom_object(GROUP, "v1beta1", ns, "workloadentries", "vm-1")
    assert got["apiVersion"] == f"{GROUP}/v1beta1" and got["spec"] == obj["spec"]

    got["spec"]["address"] = "10.128.0.8"
    replaced = custom.replace_namespaced_custom_object(GROUP, "v1beta1", ns, "workloadentries", "vm-1", got)
    assert replaced["apiVersion"] == f"{GROUP}/v1beta1" and replaced["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:
        custom.replace_namespaced_custom_object(GROUP, "v1beta1", ns, "workloadentries", "vm-1", got)  # stale
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    del got["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as err:
        custom.replace_namespaced_custom_object(GROUP, "v1beta1", ns, "workloadentries", "vm-1", got)
    assert err.value.status == 422 and "metadata.resourceVersion" in status_of(err.value)["message"]

    merged = custom.patch_namespaced_custom_object(
        GROUP, "v1", ns, "workloadentries", "vm-1", {"metadata": {"labels": {"tier": "b"}}, "spec": {"weight": 3}})
    assert merged["metadata"]["labels"] == {"app": "web", "tier": "b"} and merged["spec"]["weight"] == 3
    assert merged["metadata"]["generation"] == 3
    patched = custom.patch_namespaced_custom_object(
        GROUP, "v1", ns, "workloadentries", "vm-1",
        [{"op": "test", "path": "/spec/weight", "value": 3}, {"op": "add", "path": "/spec/ports/grpc", "value": 9090},
         {"op": "remove", "path": "/spec/weight"}],
        _content_type="application/json-patch+json")
    assert patched["spec"]["ports"] == {"http": 8080, "grpc": 9090} and "weight" not in patched["spec"]
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            GROUP, "v1", ns, "workloadentries", "vm-1", [{"op": "test", "path": "/spec/address", "value": "x"}],
            _content_type="application/json-patch+json")
    assert err.value.status == 422
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", "vm-1",
                                              {"spec": {"ports": {"http": 70000}}})
    assert err.value.status == 422

    deleted = custom.delete_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", "vm-1")
    assert deleted["status"] == "Success" and deleted["details"]["uid"] == obj["metadata"]["uid"]
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", "vm-1")
    assert err.value.status == 404 and status_of(err.value)["details"]["group"] == GROUP
    with pytest.raises(ApiException) as err:
        custom.delete_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", "vm-1")
    assert err.value.status == 404


def test_workload_entry_with_port_70000_is_invalid(custom, ns):
    with pytest.raises(ApiException) as err:
        create_we(custom, ns, workload_entry("vm", ports={"http": 70000}))
    assert err.value.status == 422
    body = status_of(err.value)
    assert body["reason"] == "Invalid" and body["code"] == 422
    assert body["message"] == ('WorkloadEntry.networking.istio.io "vm" is invalid: spec.ports.http: '
                               'Invalid value: "integer": port must be between 1-65535')
    assert body["details"]["causes"] == [{"reason": "FieldValueInvalid", "field": "spec.ports.http",
                                          "message": 'Invalid value: "integer": port must be between 1-65535'}]


@pytest.mark.parametrize(
    "plural, body, expected",
    [
        ("workloadentries", workload_entry("vm", address=7), "spec.address in body must be of type string"),
        ("workloadentries", {"kind": "WorkloadEntry", "metadata": {"name": "vm"}}, "spec: Required value"),
        ("workloadentries", workload_entry("vm", weight=-1), "should be greater than or equal to 0"),
        ("workloadentries", {"metadata": {"name": "vm"}, "spec": {"ports": {"http": 80}}}, "Address is required"),
        ("workloadentries", workload_entry("vm", address="unix:///sock"), "UDS may not include ports"),
        ("serviceentries", {"metadata": {"name": "se"}, "spec": {"hosts": ["a.example"], "location": "MESH_NOWHERE"}},
         'spec.location: Unsupported value: "MESH_NOWHERE"'),
        ("serviceentries", {"metadata": {"name": "se"}, "spec": {"hosts": ["a.example"], "ports": [
            {"name": "a", "number": 80}, {"name": "b", "number": 80}]}}, "port number cannot be duplicated"),
        ("serviceentries", {"metadata": {"name": "se"}, "spec": {
            "hosts": ["a.example"], "resolution": "DNS_ROUND_ROBIN",
            "endpoints": [{"address": "a.example"}, {"address": "b.example"}]}},
         "DNS_ROUND_ROBIN mode cannot have multiple endpoints"),
        ("workloadgroups", {"metadata": {"name": "wg"}, "spec": {"template": {}, "probe": {
            "httpGet": {"port": 80, "scheme": "FTP"}}}}, "scheme must be one of [HTTP, HTTPS]"),
    ],
)
def test_istio_objects_are_validated_against_the_crd(custom, ns, plural, body, expected):
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, "v1alpha3", ns, plural,
                                               {**body, "apiVersion": f"{GROUP}/v1alpha3"})
    assert err.value.status == 422, err.value.body
    assert expected in status_of(err.value)["message"]


def test_valid_istio_objects_of_every_kind(custom, ns):
    group = {"metadata": {"name": "web"}, "spec": {
        "metadata": {"labels": {"app": "web"}}, "template": {"serviceAccount": "vm", "ports": {"http": 8080}},
        "probe": {"httpGet": {"port": 8080, "path": "/ready"}, "periodSeconds": 5}}}
    entry = {"metadata": {"name": "web"}, "spec": {
        "hosts": ["web.example.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"name": "http", "number": 80, "protocol": "HTTP", "targetPort": 8080}],
        "workloadSelector": {"labels": {"app": "web"}}}}
    custom.create_namespaced_custom_object(GROUP, "v1", ns, "workloadgroups", group)
    custom.create_namespaced_custom_object(GROUP, "v1", ns, "serviceentries", entry)
    listed = custom.list_namespaced_custom_object(GROUP, "v1", ns, "serviceentries")
    assert listed["kind"] == "ServiceEntryList" and [i["metadata"]["name"] for i in listed["items"]] == ["web"]


def test_unknown_fields_are_pruned_or_refused_when_strict(custom, ns):
    created, _, headers = custom.create_namespaced_custom_object_with_http_info(
        GROUP, "v1", ns, "workloadentries", workload_entry("vm", colour="blue"))
    assert "colour" not in created["spec"]
    assert headers["Warning"] == '299 - "unknown field \\"spec.colour\\""'
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", workload_entry("vm2", colour="blue"),
                                               field_validation="Strict")
    assert err.value.status == 400 and 'unknown field "spec.colour"' in status_of(err.value)["message"]


def test_status_is_written_only_through_the_status_subresource(custom, ns):
    body = workload_entry("vm")
    body["status"] = {"conditions": [{"type": "Healthy", "status": "True"}]}
    created = create_we(custom, ns, body)
    assert "status" not in created
    status = {"metadata": {"name": "vm"}, "status": {"conditions": [{"type": "Healthy", "status": "True"}]}}
    updated = custom.patch_namespaced_custom_object_status(GROUP, "v1", ns, "workloadentries", "vm", status)
    assert updated["status"]["conditions"][0]["type"] == "Healthy"
    assert updated["metadata"]["generation"] == 1
    spec_change = custom.patch_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", "vm",
                                                        {"spec": {"weight": 2}, "status": None})
    assert spec_change["status"]["conditions"][0]["type"] == "Healthy"


def _post(endpoint, ca_file, token, path, body: bytes, content_type: str) -> tuple[int, dict]:
    """A raw HTTPS POST, for request formats the generated client never sends."""
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(endpoint + path, data=body, method="POST", headers={
        "Authorization": "Bearer " + token, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_yaml_and_protobuf_bodies(endpoint, ca_file, world, ns):
    path = f"/apis/{GROUP}/v1/namespaces/{ns}/workloadentries"
    code, created = _post(endpoint, ca_file, world.admin_token, path,
                          yaml.safe_dump(workload_entry("from-yaml")).encode(), "application/yaml")
    assert code == 201 and created["metadata"]["name"] == "from-yaml"

    # kubectl's typed clients send built-in kinds as protobuf (runtime.Unknown in the k8s\0 envelope).
    name = "pb-" + uuid.uuid4().hex[:6]
    body = encode_object({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": name, "labels": {"team": "a"}}})
    code, created = _post(endpoint, ca_file, world.admin_token, "/api/v1/namespaces", body, PROTOBUF_MEDIA_TYPE)
    assert code == 201, created
    assert created["metadata"]["name"] == name and created["metadata"]["labels"]["team"] == "a"
    assert created["status"] == {"phase": "Active"}

    code, status = _post(endpoint, ca_file, world.admin_token, "/api/v1/namespaces", b"k8s\x00\x0a\xff",
                         PROTOBUF_MEDIA_TYPE)
    assert code == 400 and status["reason"] == "BadRequest" and "protobuf" in status["message"]
    # A kind the sandbox cannot read as protobuf is refused, not misread.
    service = MAGIC + encode_message({"typeMeta": {"apiVersion": "v1", "kind": "Service"}, "raw": b""}, UNKNOWN)
    code, status = _post(endpoint, ca_file, world.admin_token, f"/api/v1/namespaces/{ns}/services", service,
                         PROTOBUF_MEDIA_TYPE)
    assert code == 415 and status["reason"] == "UnsupportedMediaType"


def test_dry_run_stores_nothing(custom, ns):
    custom.create_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", workload_entry("vm"), dry_run="All")
    assert custom.list_namespaced_custom_object(GROUP, "v1", ns, "workloadentries")["items"] == []


# --- lists: selectors, paging, all namespaces ----------------------------------------------------------

LABELLED = {
    "a": {"app": "web", "tier": "front"},
    "b": {"app": "web", "tier": "back"},
    "c": {"app": "db"},
    "d": {},
}


@pytest.fixture
def labelled(custom, ns) -> str:
    for name, labels in LABELLED.items():
        create_we(custom, ns, workload_entry(name, labels))
    return ns


@pytest.mark.parametrize(
    "selector, names",
    [
        ("app=web", "ab"),
        ("app==web", "ab"),
        ("app!=web", "cd"),
        ("app in (web, db)", "abc"),
        ("app notin (web)", "cd"),
        ("tier", "ab"),
        ("!tier", "cd"),
        ("app=web,tier notin (front)", "b"),
        ("app in (web,db),!tier", "c"),
        ("", "abcd"),
    ],
)
def test_label_selectors(custom, labelled, selector, names):
    listed = custom.list_namespaced_custom_object(GROUP, "v1", labelled, "workloadentries", label_selector=selector)
    assert "".join(i["metadata"]["name"] for i in listed["items"]) == names


def test_bad_label_selector_is_400(custom, ns):
    with pytest.raises(ApiException) as err:
        custom.list_namespaced_custom_object(GROUP, "v1", ns, "workloadentries", label_selector="app in web")
    assert err.value.status == 400


def test_field_selector_on_name(custom, labelled):
    listed = custom.list_namespaced_custom_object(GROUP, "v1", labelled, "workloadentries",
                                                  field_selector="metadata.name=c")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["c"]


def test_paging_with_limit_and_continue(custom, labelled):
    seen, token, pages = [], None, 0
    while True:
        page = custom.list_namespaced_custom_object(GROUP, "v1", labelled, "workloadentries", limit=3,
                                                    _continue=token)
        pages += 1
        seen += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == 1
    assert seen == list("abcd") and pages == 2


def test_paging_with_a_selector_leaves_the_remaining_count_unset(custom, labelled):
    """ListMeta: with label or field selectors the number of remaining items is unknown and left unset."""
    seen, token = [], None
    while True:
        page = custom.list_namespaced_custom_object(GROUP, "v1", labelled, "workloadentries", limit=1,
                                                    label_selector="app", _continue=token)
        seen += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
        assert "remainingItemCount" not in page["metadata"]
        if not token:
            break
    everything = custom.list_namespaced_custom_object(GROUP, "v1", labelled, "workloadentries", label_selector="app")
    assert seen == [i["metadata"]["name"] for i in everything["items"]] and len(seen) >= 2


def test_cluster_wide_list_of_workload_entries(custom, labelled, core):
    other = "t-" + uuid.uuid4().hex[:8]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    create_we(custom, other, workload_entry("e", {"app": "web"}))
    listed = custom.list_cluster_custom_object(GROUP, "v1", "workloadentries", label_selector="app=web")
    found = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]}
    assert {(labelled, "a"), (labelled, "b"), (other, "e")} <= found
    assert (labelled, "c") not in found


# --- the pure pieces: patches, selectors, every CEL rule in the CRD file --------------------------------


@pytest.mark.parametrize(
    "ops, expected",
    [
        ([{"op": "add", "path": "/a/-", "value": 3}], {"a": [1, 2, 3], "b": {"c": "d"}}),
        ([{"op": "add", "path": "/a/0", "value": 0}], {"a": [0, 1, 2], "b": {"c": "d"}}),
        ([{"op": "remove", "path": "/a/1"}], {"a": [1], "b": {"c": "d"}}),
        ([{"op": "replace", "path": "/b/c", "value": "e"}], {"a": [1, 2], "b": {"c": "e"}}),
        ([{"op": "move", "from": "/b/c", "path": "/x"}], {"a": [1, 2], "b": {}, "x": "d"}),
        ([{"op": "copy", "from": "/b", "path": "/b~1c"}], {"a": [1, 2], "b": {"c": "d"}, "b/c": {"c": "d"}}),
        ([{"op": "test", "path": "/a", "value": [1, 2]}], {"a": [1, 2], "b": {"c": "d"}}),
    ],
)
def test_json_patch_operations(ops, expected):
    assert json_patch({"a": [1, 2], "b": {"c": "d"}}, ops) == expected


def test_merge_patch_follows_rfc7386():
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": None, "e": 3}, "d": [2]}) == {
        "a": {"c": 2, "e": 3}, "d": [2]}


def test_selector_keeps_commas_inside_sets_together():
    requirements = parse_selector("app in (a,b),x!=y")
    assert selector_matches(requirements, {"app": "b"})
    assert not selector_matches(requirements, {"app": "b", "x": "y"})


# Every distinct x-kubernetes-validations rule in vm-crds.yaml, with a value it accepts and one it refuses.
CEL_CASES = {
    "0 < self && self <= 65535": (8080, 70000),
    'self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))':
        ({"http": 80, "grpc-web": 81}, {"-http": 80}),
    "self.all(l1, self.exists_one(l2, l1.number == l2.number))":
        ([{"number": 80}, {"number": 443}], [{"number": 80}, {"number": 80}]),
    'self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true':
        ("unix:///var/run/sock", "unix://relative"),
    'self.startsWith("unix://") ? !self.endsWith("/") : true': ("unix:///sock", "unix:///dir/"),
    "has(self.address) || has(self.network)": ({"network": "n1"}, {"ports": {"http": 80}}),
    '(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true':
        ({"address": "10.0.0.1", "ports": {"http": 80}}, {"address": "unix:///s", "ports": {"http": 80}}),
    'self != "*"': ("a.example", "*"),
    '!self.contains("*")': ("web", "web-*"),
    'self in ["", "HTTP", "HTTPS"]': ("HTTPS", "FTP"),
    "(has(self.workloadSelector) ? 1 : 0) + (has(self.endpoints) ? 1 : 0) <= 1":
        ({"workloadSelector": {}}, {"workloadSelector": {}, "endpoints": []}),
    '!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && '
    '!((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))':
        ({"addresses": ["10.0.0.0/8"], "resolution": "STATIC"}, {"addresses": ["10.0.0.0/8"], "resolution": "DNS"}),
    '((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true':
        ({"resolution": "STATIC", "endpoints": []}, {"endpoints": []}),
    '((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? '
    '((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true':
        ({"resolution": "DNS_ROUND_ROBIN", "endpoints": [{}]},
         {"resolution": "DNS_ROUND_ROBIN", "endpoints": [{}, {}]}),
}


def _rules_in(node) -> set[str]:
    if isinstance(node, dict):
        own = {check["rule"] for check in node.get("x-kubernetes-validations", ())}
        return own.union(*(_rules_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_rules_in(v) for v in node))
    return set()


def test_the_cel_table_covers_every_rule_in_the_crd_file():
    with open(CRD_PATH, encoding="utf-8") as handle:
        rules = set().union(*(_rules_in(doc) for doc in yaml.safe_load_all(handle) if doc))
    assert rules == set(CEL_CASES)


@pytest.mark.parametrize("rule", sorted(CEL_CASES))
def test_cel_rule_accepts_and_refuses(rule):
    cel = CelRules()
    cel.add(rule)
    accepted, refused = CEL_CASES[rule]
    assert cel.holds(rule, accepted)
    assert not cel.holds(rule, refused)


def test_cel_substring_out_of_range_fails_the_rule():
    rule = 'self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true'
    cel = CelRules()
    cel.add(rule)
    assert not cel.holds(rule, "unix://")


# --- real kubectl --------------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


@pytest.fixture
def kubectl(endpoint, ca_file, world, tmp_path):
    """Run kubectl against the emulator with a plain kubeconfig (CA file + bearer token), no extra flags."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {"server": endpoint, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "admin", "user": {"token": world.admin_token}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "admin", "namespace": "default"}}],
        "current-context": "sandbox",
    }))

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                              text=True, timeout=60, env={"HOME": str(tmp_path)})
        if check:
            assert done.returncode == 0, done.stderr
        return done

    return run


@needs_kubectl
def test_kubectl_get_namespaces(kubectl):
    out = kubectl("get", "namespaces").stdout
    assert "istio-system" in out and "default" in out
    assert "kube-system" in kubectl("get", "ns", "-o", "name").stdout


@needs_kubectl
def test_kubectl_apply_and_delete_a_namespace(kubectl):
    manifest = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "from-kubectl"}})
    assert "created" in kubectl("apply", "-f", "-", stdin=manifest).stdout
    assert "Active" in kubectl("get", "namespace", "from-kubectl", "-o", "jsonpath={.status.phase}").stdout
    assert "deleted" in kubectl("delete", "namespace", "from-kubectl").stdout


@needs_kubectl
def test_kubectl_apply_and_get_workload_entries(kubectl, ns):
    manifest = yaml.safe_dump(workload_entry("vm-from-kubectl", {"app": "web"}) | {
        "metadata": {"name": "vm-from-kubectl", "namespace": ns, "labels": {"app": "web"}}})
    assert "created" in kubectl("apply", "-f", "-", stdin=manifest).stdout
    got = json.loads(kubectl("get", "workloadentry", "vm-from-kubectl", "-n", ns, "-o", "json").stdout)
    assert got["spec"]["address"] == "10.128.0.7"
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]

    changed = manifest.replace("10.128.0.7", "10.128.0.9")
    assert "configured" in kubectl("apply", "-f", "-", stdin=changed).stdout
    assert kubectl("get", "we", "vm-from-kubectl", "-n", ns, "-o", "jsonpath={.spec.address}").stdout == "10.128.0.9"

    listing = kubectl("get", "workloadentries", "-A").stdout
    assert ns in listing and "vm-from-kubectl" in listing

    invalid = manifest.replace("8080", "70000")
    refused = kubectl("apply", "-f", "-", stdin=invalid, check=False)
    assert refused.returncode != 0 and "port must be between 1-65535" in refused.stderr

    assert "deleted" in kubectl("delete", "we", "vm-from-kubectl", "-n", ns).stdout
