"""The metadata server emulator: google-auth finds it unchanged, and a VM reads its live attributes.

google-auth reads GCE_METADATA_HOST when `google.auth.compute_engine._metadata` is imported, so the
fresh-process test is the faithful one; the in-process test also patches that module-level copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from google.cloud import compute_v1
from google.oauth2.credentials import Credentials

from meshjoin_sandbox.compute import ComputeEmulator
from meshjoin_sandbox.metadata import MetadataEmulator
from meshjoin_sandbox.web import serve
from meshjoin_sandbox.compute import DEFAULT_SCOPES
from meshjoin_sandbox.world import CLOUD_PLATFORM, USERINFO_EMAIL, World

ZONE = "us-central1-a"
FLAVOR = {"Metadata-Flavor": "Google"}
VM_SA = "vm-sa@meshjoin-sandbox.iam.gserviceaccount.com"
ATTRIBUTES = {"startup-script": "echo hi", "color": "red"}


@pytest.fixture(scope="module")
def servers():
    """Loopback servers for the module; each test plugs fresh emulators into their slots."""
    slots, running = {}, []
    for name in ("compute", "functions", "vm"):
        server = serve(lambda environ, start, name=name: slots[name](environ, start), "127.0.0.1", 0, name=name)
        running.append(server)
        slots[f"{name}_host"] = f"127.0.0.1:{server.server_port}"
    yield slots
    for server in running:
        server.shutdown()


@pytest.fixture
def sandbox(servers):
    world = World()
    compute = ComputeEmulator(world)
    compute.seed_instance(ZONE, "vm-1", labels={"mesh": "join"}, metadata=ATTRIBUTES,
                          service_account=VM_SA)
    servers["compute"] = compute.app
    servers["functions"] = MetadataEmulator(world).app
    servers["vm"] = MetadataEmulator(world, (ZONE, "vm-1")).app
    instances = compute_v1.InstancesClient(
        transport="rest", client_options={"api_endpoint": f"http://{servers['compute_host']}"},
        credentials=Credentials(world.admin_token))
    return SimpleNamespace(world=world, compute=compute, instances=instances,
                           functions=f"http://{servers['functions_host']}", vm=f"http://{servers['vm_host']}",
                           functions_host=servers["functions_host"])


def md(base: str, path: str, **params) -> requests.Response:
    return requests.get(f"{base}/computeMetadata/v1/{path}", params=params, headers=FLAVOR, timeout=30)


def set_metadata(sandbox, **items):
    current = sandbox.instances.get(project=sandbox.world.project, zone=ZONE, instance="vm-1").metadata
    merged = {i.key: i.value for i in current.items} | items
    resource = compute_v1.Metadata(fingerprint=current.fingerprint,
                                   items=[compute_v1.Items(key=k, value=v) for k, v in merged.items()])
    sandbox.instances.set_metadata_unary(project=sandbox.world.project, zone=ZONE, instance="vm-1",
                                         metadata_resource=resource)


# ---- google-auth, unchanged -------------------------------------------------------------------------

PROBE = """
import json, google.auth, google.auth.transport.requests
from google.auth import compute_engine
from google.oauth2 import id_token
request = google.auth.transport.requests.Request()
credentials, project = google.auth.default()
credentials.refresh(request)
token = id_token.fetch_id_token(request, "https://meshjoin.example/hook")
claims = google.auth.jwt.decode(token, verify=False)
print(json.dumps({"gce": isinstance(credentials, compute_engine.Credentials), "project": project,
                  "token": credentials.token, "email": credentials.service_account_email, "aud": claims["aud"]}))
"""


def test_google_auth_default_finds_it_from_the_environment_alone(sandbox, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GOOGLE_", "CLOUDSDK_", "GCLOUD_", "GCE_"))}
    env.update(GCE_METADATA_HOST=sandbox.functions_host, GCE_METADATA_IP=sandbox.functions_host,
               HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    probed = json.loads(done.stdout)
    principal = sandbox.world.principal_of(probed.pop("token"))
    assert probed == {"gce": True, "project": sandbox.world.project,
                      "email": sandbox.world.service_account, "aud": "https://meshjoin.example/hook"}
    assert principal.email == sandbox.world.service_account and principal.scopes == {CLOUD_PLATFORM}


def test_google_auth_default_in_process(sandbox, monkeypatch, tmp_path):
    import google.auth
    import google.auth.transport.requests
    from google.auth import compute_engine
    from google.auth.compute_engine import _metadata

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_HOST", sandbox.functions_host)
    monkeypatch.setenv("GCE_METADATA_IP", sandbox.functions_host)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", sandbox.functions_host)

    credentials, project = google.auth.default()
    assert isinstance(credentials, compute_engine.Credentials) and project == sandbox.world.project
    credentials.refresh(google.auth.transport.requests.Request())
    principal = sandbox.world.principal_of(credentials.token)
    assert principal.email == sandbox.world.service_account and credentials.expiry is not None
    # Scopes asked for reach the token (google-auth sends ?scopes=a,b), as on Cloud Run.
    scoped = compute_engine.Credentials(scopes=[CLOUD_PLATFORM, USERINFO_EMAIL])
    scoped.refresh(google.auth.transport.requests.Request())
    assert sandbox.world.principal_of(scoped.token).scopes == {CLOUD_PLATFORM, USERINFO_EMAIL}


# ---- the functions' view ----------------------------------------------------------------------------

def test_every_request_needs_the_flavor_header_and_every_answer_carries_it(sandbox):
    assert requests.get(f"{sandbox.functions}/computeMetadata/v1/project/project-id", timeout=5).status_code == 403
    ping = requests.get(sandbox.functions, headers=FLAVOR, timeout=5)
    assert ping.status_code == 200 and ping.headers["Metadata-Flavor"] == "Google"
    proxied = requests.get(f"{sandbox.functions}/computeMetadata/v1/project/project-id",
                           headers={**FLAVOR, "X-Forwarded-For": "10.0.0.1"}, timeout=5)
    assert proxied.status_code == 403


def test_project_zone_and_service_account(sandbox):
    world = sandbox.world
    assert md(sandbox.functions, "project/project-id").text == world.project
    assert md(sandbox.functions, "project/numeric-project-id").text == world.project_number
    assert md(sandbox.functions, "project/project-id", alt="json").json() == world.project
    assert md(sandbox.functions, "instance/zone").text == f"projects/{world.project_number}/zones/{world.zone}"
    assert md(sandbox.functions, "instance/service-accounts/default/email").text == world.service_account
    info = md(sandbox.functions, "instance/service-accounts/default/", recursive="true")
    assert info.headers["Content-Type"] == "application/json"
    assert info.json()["email"] == world.service_account and "default" in info.json()["aliases"]
    scopes = md(sandbox.functions, "instance/service-accounts/default/scopes").text
    assert scopes == "https://www.googleapis.com/auth/cloud-platform"
    accounts = md(sandbox.functions, "instance/service-accounts/").text.splitlines()
    assert accounts == ["default/", f"{world.service_account}/"]
    # Not a VM: no instance attributes.
    assert md(sandbox.functions, "instance/attributes/").status_code == 404


def test_token_and_identity(sandbox):
    token = md(sandbox.functions, "instance/service-accounts/default/token", scopes="x,y").json()
    assert token["expires_in"] == 3599 and token["token_type"] == "Bearer"
    principal = sandbox.world.principal_of(token["access_token"])
    assert principal.email == sandbox.world.service_account and principal.scopes == {"x", "y"}
    default = md(sandbox.functions, "instance/service-accounts/default/token").json()["access_token"]
    assert sandbox.world.principal_of(default).scopes == {CLOUD_PLATFORM}
    identity = md(sandbox.functions, "instance/service-accounts/default/identity", audience="aud", format="full")
    assert identity.status_code == 200 and identity.text.count(".") == 2
    assert md(sandbox.functions, "instance/service-accounts/default/identity").status_code == 400
    assert md(sandbox.functions, "instance/service-accounts/nobody@x.iam.gserviceaccount.com/token").status_code == 404


# ---- a VM's view ------------------------------------------------------------------------------------

def test_vm_identity_and_network(sandbox):
    vm = sandbox.compute.instance(ZONE, "vm-1")
    assert md(sandbox.vm, "instance/name").text == "vm-1"
    assert md(sandbox.vm, "instance/id").text == vm["id"]
    assert md(sandbox.vm, "instance/network-interfaces/0/ip").text == vm["networkInterfaces"][0]["networkIP"]
    assert md(sandbox.vm, "instance/service-accounts/default/email").text == VM_SA
    assert md(sandbox.vm, "instance/hostname").text == f"vm-1.{ZONE}.c.{sandbox.world.project}.internal"


def test_vm_token_is_the_vms_account_with_the_vms_scopes(sandbox):
    """GCE's access scopes are fixed at insert: asking for more does not widen them."""
    for params in ({}, {"scopes": CLOUD_PLATFORM}):
        token = md(sandbox.vm, "instance/service-accounts/default/token", **params).json()["access_token"]
        principal = sandbox.world.principal_of(token)
        assert principal.email == VM_SA and principal.scopes == set(DEFAULT_SCOPES)
    assert md(sandbox.vm, f"instance/service-accounts/{sandbox.world.service_account}/token").status_code == 404


def test_vm_attributes(sandbox):
    assert md(sandbox.vm, "instance/attributes/").text.splitlines() == ["color", "startup-script"]
    assert md(sandbox.vm, "instance/attributes/", recursive="true").json() == ATTRIBUTES
    assert md(sandbox.vm, "instance/attributes/color").text == "red"
    assert md(sandbox.vm, "instance/attributes/color", alt="json").json() == "red"
    assert md(sandbox.vm, "instance/attributes/absent").status_code == 404
    set_metadata(sandbox, color="blue")
    assert md(sandbox.vm, "instance/attributes/color").text == "blue"


def test_recursive_json_uses_camel_case_for_structure_only(sandbox):
    instance = md(sandbox.vm, "instance/", recursive="true").json()
    assert instance["networkInterfaces"]["0"]["ip"] and instance["serviceAccounts"]["default"]["email"]
    assert instance["attributes"]["startup-script"] == "echo hi"


def test_wait_for_change_returns_when_the_value_changes(sandbox):
    first = md(sandbox.vm, "instance/attributes/color")
    etag = first.headers["ETag"]
    timer = threading.Timer(0.3, set_metadata, args=(sandbox,), kwargs={"color": "green"})
    timer.start()
    started = time.monotonic()
    changed = md(sandbox.vm, "instance/attributes/color", wait_for_change="true", last_etag=etag, timeout_sec="20")
    timer.join()
    assert changed.text == "green" and changed.headers["ETag"] != etag
    assert 0.2 < time.monotonic() - started < 10


def test_wait_for_change_on_a_directory_and_with_a_stale_etag(sandbox):
    listing = md(sandbox.vm, "instance/attributes/", recursive="true")
    threading.Timer(0.2, set_metadata, args=(sandbox,), kwargs={"meshjoin-bootstrap": "v1"}).start()
    changed = md(sandbox.vm, "instance/attributes/", recursive="true", wait_for_change="true",
                 last_etag=listing.headers["ETag"], timeout_sec="20")
    assert changed.json()["meshjoin-bootstrap"] == "v1"
    started = time.monotonic()
    stale = md(sandbox.vm, "instance/attributes/", recursive="true", wait_for_change="true",
               last_etag=listing.headers["ETag"], timeout_sec="20")
    assert stale.json()["meshjoin-bootstrap"] == "v1" and time.monotonic() - started < 1


def test_wait_for_change_times_out_with_the_unchanged_value(sandbox):
    first = md(sandbox.vm, "instance/attributes/color")
    started = time.monotonic()
    same = md(sandbox.vm, "instance/attributes/color", wait_for_change="true",
              last_etag=first.headers["ETag"], timeout_sec="1")
    assert same.text == "red" and same.headers["ETag"] == first.headers["ETag"]
    assert time.monotonic() - started >= 0.9


def test_a_deleted_vm_has_no_attributes(sandbox):
    sandbox.instances.delete_unary(project=sandbox.world.project, zone=ZONE, instance="vm-1")
    assert md(sandbox.vm, "instance/attributes/").status_code == 404
    assert md(sandbox.vm, "project/project-id").text == sandbox.world.project
