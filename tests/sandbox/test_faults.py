"""Fault injection of the emulators (web.FaultInjector), seen through the real client libraries:
errors with a probability or for the next N calls, latency, timeouts past the client's deadline,
answers lost after the write was applied, and partial listings."""

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
from meshjoin_sandbox.crds import istio_crds_path
from meshjoin_sandbox.control import ControlEmulator
from meshjoin_sandbox.kube import KubeEmulator
from meshjoin_sandbox.secretmanager import SecretManagerEmulator
from meshjoin_sandbox.web import ApiError, serve
from meshjoin_sandbox.world import World

ZONE = "us-central1-a"
CRD_PATH = str(istio_crds_path())
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def servers():
    """Loopback servers whose app each test swaps for fresh emulators of a fresh world."""
    slots = {}
    started = {name: serve(lambda environ, start, name=name: slots[name](environ, start), "127.0.0.1", 0, name=name)
               for name in ("compute", "secretmanager", "kube", "control")}
    yield slots, {name: f"http://127.0.0.1:{server.server_port}" for name, server in started.items()}
    for server in started.values():
        server.shutdown()


@pytest.fixture(scope="module")
def kube_emulator():
    return KubeEmulator(World(), CRD_PATH)  # loading Istio's CRDs (CEL rules) takes a second: once per module


@pytest.fixture
def world(servers, kube_emulator):
    slots, urls = servers
    world = World()
    world.publish_audit = lambda entry: None
    compute, secrets = ComputeEmulator(world), SecretManagerEmulator(world)
    kube = kube_emulator
    kube.world = kube.faults.world = world  # the world's tokens; fresh rules and counters
    world.emulators["kube"] = kube
    kube.faults.clear()
    kube.faults.reset_counters()
    slots.update(compute=compute.app, secretmanager=secrets.app, kube=kube.app, control=ControlEmulator(world).app)
    admin, product = Credentials(world.admin_token), Credentials(world.sa_token)
    options = {"api_endpoint": urls["compute"]}
    return SimpleNamespace(
        world=world, compute=compute, secrets=secrets, kube=kube, urls=urls,
        instances=compute_v1.InstancesClient(transport="rest", client_options=options, credentials=admin),
        as_product=compute_v1.InstancesClient(transport="rest", client_options=options, credentials=product),
        sm=secretmanager_v1.SecretManagerServiceClient(
            transport="rest", client_options={"api_endpoint": urls["secretmanager"]}, credentials=product))


def create_vm(w, name: str, zone: str = ZONE) -> None:
    w.compute.seed_instance(zone, name, labels={"mesh": "join"})


def get(w, name, client=None, **kwargs):
    return (client or w.instances).get(project=w.world.project, zone=ZONE, instance=name, retry=None, **kwargs)


def set_item(w, name: str, key: str, value: str, client=None, **kwargs):
    current = get(w, name)
    body = compute_v1.Metadata(fingerprint=current.metadata.fingerprint, items=[compute_v1.Items(key=key, value=value)])
    return (client or w.instances).set_metadata_unary(project=w.world.project, zone=ZONE, instance=name,
                                                      metadata_resource=body, retry=None, **kwargs)


def items(w, name: str) -> dict:
    return {i.key: i.value for i in get(w, name).metadata.items}


def test_next_n_calls_fail_then_recover(world):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "instances.get", "status": 429, "count": 2})
    for _ in range(2):
        with pytest.raises(exceptions.TooManyRequests):
            get(world, "vm-1")
    assert get(world, "vm-1").name == "vm-1"
    assert world.compute.faults.stats()["injected"] == {"instances.get": {"error": 2}}


def test_probability_is_seeded_and_counted(world):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "instances.*", "probability": 0.3, "status": 503, "seed": 7})
    failures = 0
    for _ in range(100):
        try:
            get(world, "vm-1")
        except exceptions.ServiceUnavailable:
            failures += 1
    assert 15 <= failures <= 45
    stats = world.compute.faults.stats()
    assert stats["injected"]["instances.get"]["error"] == failures and stats["calls"]["instances.get"] == 100


def test_principal_product_spares_the_operator(world):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "*", "count": None, "principal": "product"})
    assert get(world, "vm-1").name == "vm-1"
    with pytest.raises(exceptions.ServiceUnavailable):
        get(world, "vm-1", client=world.as_product)


def test_latency_delays_and_then_serves(world):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "instances.get", "kind": "latency", "seconds": 0.5})
    started = time.monotonic()
    assert get(world, "vm-1").name == "vm-1"
    assert time.monotonic() - started >= 0.5


def test_timeout_outlives_the_client_and_applies_nothing(world):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "instances.setMetadata", "kind": "timeout", "seconds": 3})
    with pytest.raises(requests.exceptions.Timeout):
        set_item(world, "vm-1", "k", "v", timeout=0.5)
    world.compute.faults.clear()  # wakes the stalled call at once
    assert "k" not in items(world, "vm-1")


@pytest.mark.parametrize("after, error", [("status", exceptions.ServiceUnavailable),
                                          ("close", requests.exceptions.ConnectionError),
                                          ("timeout", requests.exceptions.Timeout)])
def test_drop_applies_the_write_and_loses_the_answer(world, after, error):
    create_vm(world, "vm-1")
    world.compute.faults.add({"method": "instances.setMetadata", "kind": "drop", "after": after, "seconds": 2})
    with pytest.raises(error):
        set_item(world, "vm-1", "k", "v", timeout=0.5)
    world.compute.faults.clear()
    assert items(world, "vm-1")["k"] == "v"  # it happened


def test_secret_version_added_although_the_answer_was_lost(world):
    # The operator's client: the functions' account may not add versions outside its prefix (IAM).
    sm = secretmanager_v1.SecretManagerServiceClient(
        transport="rest", client_options={"api_endpoint": world.urls["secretmanager"]},
        credentials=Credentials(world.world.admin_token))
    parent = f"projects/{world.world.project}/secrets/s"
    sm.create_secret(parent=f"projects/{world.world.project}", secret_id="s",
                     secret={"replication": {"automatic": {}}}, retry=None)
    world.secrets.faults.add({"method": "secrets.versions.add", "kind": "drop"})
    with pytest.raises(exceptions.ServiceUnavailable):
        sm.add_secret_version(parent=parent, payload={"data": b"x"}, retry=None)
    versions = list(sm.list_secret_versions(parent=parent, retry=None))
    assert [v.name.rsplit("/", 1)[-1] for v in versions] == ["1"]


def test_partial_listing_hides_a_zone_and_says_so_unless_silent(world):
    for name, zone in (("a-1", ZONE), ("b-1", "us-central1-b"), ("b-2", "us-central1-b")):
        create_vm(world, name, zone)
    request = compute_v1.AggregatedListInstancesRequest(project=world.world.project)
    world.compute.faults.add({"method": "instances.aggregatedList", "kind": "partial", "zone": "us-central1-b"})
    response = world.instances.aggregated_list(request=request, retry=None)
    names = [i.name for _, scoped in response for i in scoped.instances]
    assert names == ["a-1"]
    page = next(iter(response.pages))
    assert list(page.unreachables) == ["zones/us-central1-b"]
    assert page.items["zones/us-central1-b"].warning.code == "UNREACHABLE"
    world.compute.faults.add({"method": "instances.aggregatedList", "kind": "partial", "mark": False})
    page = next(iter(world.instances.aggregated_list(request=request, retry=None).pages))
    assert not page.unreachables and sorted(i.name for _, s in page.items.items() for i in s.instances) == \
        ["b-1", "b-2"]


def test_kube_faults_are_per_resource_and_verb(world):
    # As the operator (cluster-admin): this cluster has no kubernetes.tf bindings for the functions.
    headers = {"Authorization": f"Bearer {world.world.admin_token}"}
    base = world.urls["kube"] + "/api/v1/namespaces/default/serviceaccounts"
    world.kube.faults.add({"method": "serviceaccounts.create", "kind": "drop", "after": "close"})
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(base, json={"metadata": {"name": "web"}}, headers=headers, timeout=5)
    assert requests.get(f"{base}/web", headers=headers, timeout=5).status_code == 200  # created all the same
    world.kube.faults.add({"method": "serviceaccounts.get", "status": 429})
    answer = requests.get(f"{base}/web", headers=headers, timeout=5)
    assert answer.status_code == 429 and answer.json()["kind"] == "Status"
    assert world.kube.faults.stats()["injected"] == {"serviceaccounts.create": {"drop": 1},
                                                     "serviceaccounts.get": {"error": 1}}


def test_control_plane_takes_specs_and_reports_counts(world):
    control = world.urls["control"]
    bad = requests.post(f"{control}/faults", json={"emulator": "kube", "method": "nothing.create"}, timeout=5)
    assert bad.status_code == 400 and "matches no method" in bad.text
    ok = requests.post(f"{control}/faults", timeout=5, json={
        "emulator": "secretmanager", "method": "secrets.*", "probability": 0.5, "kind": "drop", "after": "close"})
    assert ok.status_code == 200
    stats = requests.get(f"{control}/faults", timeout=5).json()
    assert set(stats) == {"compute", "secretmanager", "kube"}
    assert stats["secretmanager"]["rules"][0]["kind"] == "drop"
    requests.delete(f"{control}/faults", timeout=5)
    assert requests.get(f"{control}/faults", timeout=5).json()["secretmanager"]["rules"] == []


def test_bad_specs_are_refused(world):
    for spec in ({"method": "instances.get", "kind": "explode"}, {"method": "instances.get", "probability": 2},
                 {"method": "instances.get", "principal": "someone"}, {"kind": "error"}):
        with pytest.raises(ApiError):
            world.compute.faults.add(spec)
    assert json.dumps(world.compute.faults.stats()["rules"]) == "[]"
