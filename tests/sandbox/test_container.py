"""The GKE emulator, driven by the unmodified container_v1 REST client."""

from __future__ import annotations

import base64
import socket

import pytest
import requests
from google.api_core import exceptions
from google.cloud import container_v1
from google.oauth2.credentials import Credentials

from meshjoin_sandbox.container import ContainerEmulator
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.world import World

FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIBsandbox\n-----END CERTIFICATE-----\n"
CLUSTER = "projects/meshjoin-sandbox/locations/us-central1/clusters/mesh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world():
    return World(kube_endpoint="127.0.0.1:6443", kube_ca_pem=FAKE_PEM)


@pytest.fixture(scope="module")
def url(world):
    port = free_port()
    server = serve(ContainerEmulator(world).app, "127.0.0.1", port, name="container")
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def client(url, world):
    return container_v1.ClusterManagerClient(
        transport="rest", client_options={"api_endpoint": url}, credentials=Credentials(world.admin_token)
    )


def test_get_cluster(client, world):
    cluster = client.get_cluster(name=CLUSTER)
    assert cluster.name == "mesh"
    assert cluster.location == "us-central1"
    assert cluster.endpoint == "127.0.0.1:6443"
    assert base64.b64decode(cluster.master_auth.cluster_ca_certificate).decode() == FAKE_PEM
    assert cluster.status == container_v1.Cluster.Status.RUNNING
    assert cluster.workload_identity_config.workload_pool == "meshjoin-sandbox.svc.id.goog"
    assert cluster.mesh_certificates.enable_certificates
    assert cluster.current_master_version and cluster.self_link.endswith(CLUSTER)
    assert cluster.release_channel.channel == container_v1.ReleaseChannel.Channel.REGULAR
    assert cluster.resource_labels["mesh_id"] == f"proj-{world.project_number}"


def test_get_cluster_by_number_and_zone_form(client, world):
    by_number = client.get_cluster(name=f"projects/{world.project_number}/locations/us-central1/clusters/mesh")
    assert by_number.name == "mesh"
    legacy = client.get_cluster(project_id="meshjoin-sandbox", zone="us-central1", cluster_id="mesh")
    assert legacy.endpoint == "127.0.0.1:6443"


def test_list_clusters(client):
    def names(location):
        return [c.name for c in client.list_clusters(parent=f"projects/meshjoin-sandbox/locations/{location}").clusters]

    assert names("-") == names("us-central1") == ["mesh"]
    assert names("europe-west1") == []


@pytest.mark.parametrize("name", [
    "projects/meshjoin-sandbox/locations/us-central1/clusters/other",
    "projects/meshjoin-sandbox/locations/europe-west1/clusters/mesh",
])
def test_unknown_cluster_is_not_found(client, name):
    with pytest.raises(exceptions.NotFound):
        client.get_cluster(name=name)


def test_another_projects_cluster_is_refused_before_any_lookup(client):
    name = "projects/someone-else/locations/us-central1/clusters/mesh"
    with pytest.raises(exceptions.Forbidden, match='Required "container.clusters.get" permission'):
        client.get_cluster(name=name)


def test_requires_bearer_token(url):
    response = requests.get(f"{url}/v1/{CLUSTER}")
    assert response.status_code == 401
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"
