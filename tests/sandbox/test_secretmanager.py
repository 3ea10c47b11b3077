"""The Secret Manager emulator, driven by the unmodified secretmanager_v1 REST client.

Note how the REST transport maps errors: google.api_core picks the exception class from the HTTP
status alone, so ALREADY_EXISTS arrives as `Conflict` (409) and FAILED_PRECONDITION as
`BadRequest` (400), exactly as against the real service; the gRPC status name is in `.errors`.
"""

from __future__ import annotations

import base64
import socket

import pytest
import requests
from google.api_core import exceptions
from google.auth.exceptions import RefreshError
from google.cloud import secretmanager_v1
from google.oauth2.credentials import Credentials

from meshjoin_sandbox.secretmanager import SecretManagerEmulator, crc32c
from meshjoin_sandbox.web import ApiError, serve
from meshjoin_sandbox.world import World

State = secretmanager_v1.SecretVersion.State


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One server for the module (shutting one down takes half a second); each test swaps in its app."""
    current = {}
    port = free_port()
    httpd = serve(lambda environ, start: current["app"](environ, start), "127.0.0.1", port, name="secretmanager")
    yield current, f"http://127.0.0.1:{port}"
    httpd.shutdown()


@pytest.fixture
def world():
    return World()


@pytest.fixture
def emulator(world, server):
    current, url = server
    emulator = SecretManagerEmulator(world)
    current["app"] = emulator.app
    emulator.url = url
    return emulator


def make_client(url: str, token: str) -> secretmanager_v1.SecretManagerServiceClient:
    return secretmanager_v1.SecretManagerServiceClient(
        transport="rest", client_options={"api_endpoint": url}, credentials=Credentials(token)
    )


@pytest.fixture
def client(emulator, world):
    return make_client(emulator.url, world.admin_token)


PARENT = "projects/meshjoin-sandbox"
NUMBERED = "projects/123456789012"


def create(client, secret_id, labels=None):
    return client.create_secret(
        parent=PARENT,
        secret_id=secret_id,
        secret={"replication": {"automatic": {}}, "labels": labels or {}},
    )


def add(client, secret_id, data: bytes):
    return client.add_secret_version(parent=f"{PARENT}/secrets/{secret_id}", payload={"data": data})


def status_of(exc: exceptions.GoogleAPICallError) -> str:
    return exc.errors[0]["reason"]


def test_create_get_and_duplicate(client):
    secret = create(client, "ca-key", {"meshjoin-role": "plugin-ca"})
    assert secret.name == f"{NUMBERED}/secrets/ca-key"
    assert secret.labels == {"meshjoin-role": "plugin-ca"}
    assert "automatic" in secretmanager_v1.Replication.to_dict(secret.replication)
    assert secret.etag.startswith('"') and secret.create_time.year >= 2024

    got = client.get_secret(name=f"{NUMBERED}/secrets/ca-key")  # project number works as input too
    assert got.name == secret.name and got.etag == secret.etag

    with pytest.raises(exceptions.Conflict) as exc:
        create(client, "ca-key")
    assert status_of(exc.value) == "ALREADY_EXISTS"
    assert f"Secret [{NUMBERED}/secrets/ca-key] already exists." in exc.value.message


@pytest.mark.parametrize("bad_id", ["has space", "dot.ted", "x" * 256, "slash/ed", ""])
def test_invalid_secret_id(client, bad_id):
    with pytest.raises(exceptions.BadRequest) as exc:
        create(client, bad_id)
    assert status_of(exc.value) == "INVALID_ARGUMENT"


def test_create_requires_replication_and_valid_labels(client):
    with pytest.raises(exceptions.BadRequest):
        client.create_secret(parent=PARENT, secret_id="no-replication", secret={})
    with pytest.raises(exceptions.BadRequest):
        create(client, "bad-labels", {"Upper": "x"})


def test_versions_access_latest_and_numbered(client):
    create(client, "token")
    v1 = add(client, "token", b"one")
    v2 = add(client, "token", b"two")
    assert v1.name == f"{NUMBERED}/secrets/token/versions/1"
    assert v2.name.endswith("/versions/2") and v2.state == State.ENABLED

    latest = client.access_secret_version(name=f"{PARENT}/secrets/token/versions/latest")
    assert latest.name == v2.name
    assert latest.payload.data == b"two"
    assert latest.payload.data_crc32c == crc32c(b"two")
    first = client.access_secret_version(name=f"{PARENT}/secrets/token/versions/1")
    assert first.payload.data == b"one"

    assert client.get_secret_version(name=f"{PARENT}/secrets/token/versions/latest").name == v2.name
    client.update_secret(secret={"name": f"{PARENT}/secrets/token", "version_aliases": {"current": 1}},
                         update_mask={"paths": ["version_aliases"]})
    assert client.access_secret_version(name=f"{PARENT}/secrets/token/versions/current").payload.data == b"one"
    listed = list(client.list_secret_versions(parent=f"{PARENT}/secrets/token"))
    assert [v.name.rsplit("/", 1)[1] for v in listed] == ["2", "1"]  # newest first


def test_add_version_checks_crc32c(client):
    create(client, "checked")
    good = client.add_secret_version(
        parent=f"{PARENT}/secrets/checked", payload={"data": b"abc", "data_crc32c": crc32c(b"abc")}
    )
    assert good.client_specified_payload_checksum
    with pytest.raises(exceptions.BadRequest):
        client.add_secret_version(parent=f"{PARENT}/secrets/checked", payload={"data": b"abc", "data_crc32c": 1})
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_access_missing(client):
    with pytest.raises(exceptions.NotFound) as exc:
        client.access_secret_version(name=f"{PARENT}/secrets/nope/versions/latest")
    assert f"Secret [{NUMBERED}/secrets/nope] not found or has no versions." in exc.value.message
    create(client, "empty")
    with pytest.raises(exceptions.NotFound):
        client.access_secret_version(name=f"{PARENT}/secrets/empty/versions/latest")
    add(client, "empty", b"x")
    with pytest.raises(exceptions.NotFound):
        client.access_secret_version(name=f"{PARENT}/secrets/empty/versions/7")
    with pytest.raises(exceptions.NotFound):
        client.get_secret(name=f"{PARENT}/secrets/nope")


def test_unknown_project_is_denied(client):
    with pytest.raises(exceptions.Forbidden):
        client.get_secret(name="projects/someone-else/secrets/x")


def test_list_with_label_filter_and_paging(client):
    for i in range(7):
        create(client, f"ca-{i}", {"meshjoin-role": "plugin-ca", "idx": str(i)})
    create(client, "other", {"meshjoin-role": "workload"})
    create(client, "unlabeled")

    pager = client.list_secrets(request={"parent": PARENT, "filter": "labels.meshjoin-role=plugin-ca", "page_size": 3})
    pages = list(pager.pages)
    assert [len(p.secrets) for p in pages] == [3, 3, 1]
    assert [s.name.rsplit("/", 1)[1] for p in pages for s in p.secrets] == [f"ca-{i}" for i in range(7)]

    def ids(filter_text):
        listed = client.list_secrets(request={"parent": PARENT, "filter": filter_text})
        return sorted(s.name.rsplit("/", 1)[1] for s in listed)

    assert len(ids("labels.meshjoin-role:*")) == 8
    assert ids("labels.meshjoin-role:* AND labels.idx=3") == ["ca-3"]
    assert ids("labels.meshjoin-role=plugin-ca labels.idx=3") == ["ca-3"]  # implicit AND
    assert ids("labels.idx=1 OR labels.idx=2") == ["ca-1", "ca-2"]
    assert ids("NOT labels.meshjoin-role:*") == ["unlabeled"]
    assert ids("-labels:meshjoin-role") == ["unlabeled"]
    assert ids("name:other") == ["other"]
    assert ids('labels.meshjoin-role="workload" OR (name:ca-6 AND labels.idx=6)') == ["ca-6", "other"]
    assert len(ids("")) == 9
    assert len(ids('create_time>"2000-01-01T00:00:00Z"')) == 9
    with pytest.raises(exceptions.BadRequest):
        ids("bogus_field=1")


def test_disable_enable_destroy(client):
    create(client, "rotating")
    add(client, "rotating", b"v1")
    add(client, "rotating", b"v2")
    latest = f"{PARENT}/secrets/rotating/versions/latest"

    disabled = client.disable_secret_version(name=f"{PARENT}/secrets/rotating/versions/2")
    assert disabled.state == State.DISABLED
    with pytest.raises(exceptions.BadRequest) as exc:
        client.access_secret_version(name=latest)  # latest is the newest version, whatever its state
    assert status_of(exc.value) == "FAILED_PRECONDITION"
    assert "is in DISABLED state" in exc.value.message
    assert client.access_secret_version(name=f"{PARENT}/secrets/rotating/versions/1").payload.data == b"v1"

    enabled_only = client.list_secret_versions(
        request={"parent": f"{PARENT}/secrets/rotating", "filter": "state:ENABLED"}
    )
    assert [v.name.rsplit("/", 1)[1] for v in enabled_only] == ["1"]

    assert client.enable_secret_version(name=f"{PARENT}/secrets/rotating/versions/2").state == State.ENABLED
    assert client.access_secret_version(name=latest).payload.data == b"v2"

    destroyed = client.destroy_secret_version(name=f"{PARENT}/secrets/rotating/versions/1")
    assert destroyed.state == State.DESTROYED and destroyed.destroy_time.year >= 2024
    with pytest.raises(exceptions.BadRequest):
        client.access_secret_version(name=f"{PARENT}/secrets/rotating/versions/1")
    with pytest.raises(exceptions.BadRequest):
        client.enable_secret_version(name=f"{PARENT}/secrets/rotating/versions/1")


def test_version_etag_is_checked(client):
    create(client, "etagged")
    version = add(client, "etagged", b"x")
    client.disable_secret_version(request={"name": version.name, "etag": version.etag})
    with pytest.raises(exceptions.BadRequest) as exc:  # the disable changed the etag
        client.enable_secret_version(request={"name": version.name, "etag": version.etag})
    assert status_of(exc.value) == "FAILED_PRECONDITION"


def test_patch_labels_and_delete(client):
    secret = create(client, "patched", {"a": "1"})
    updated = client.update_secret(
        secret={"name": secret.name, "labels": {"a": "2", "b": "x"}}, update_mask={"paths": ["labels"]}
    )
    assert updated.labels == {"a": "2", "b": "x"} and updated.etag != secret.etag
    with pytest.raises(exceptions.BadRequest):  # stale etag
        client.update_secret(secret={"name": secret.name, "labels": {}, "etag": secret.etag},
                             update_mask={"paths": ["labels"]})
    with pytest.raises(exceptions.BadRequest):  # replication is immutable
        client.update_secret(secret={"name": secret.name}, update_mask={"paths": ["replication"]})

    with pytest.raises(exceptions.BadRequest):
        client.delete_secret(request={"name": secret.name, "etag": secret.etag})
    client.delete_secret(request={"name": secret.name, "etag": updated.etag})
    with pytest.raises(exceptions.NotFound):
        client.get_secret(name=secret.name)


def test_iam_round_trip(client):
    secret = create(client, "shared")
    empty = client.get_iam_policy(request={"resource": secret.name})
    assert empty.etag == base64.b64decode("ACAB") and not empty.bindings

    binding = {"role": "roles/secretmanager.secretAccessor", "members": ["serviceAccount:x@y"]}
    stored = client.set_iam_policy(
        request={"resource": secret.name, "policy": {"bindings": [binding], "etag": empty.etag}}
    )
    got = client.get_iam_policy(request={"resource": secret.name})
    assert got.etag == stored.etag != empty.etag
    assert [(b.role, list(b.members)) for b in got.bindings] == [(binding["role"], binding["members"])]

    with pytest.raises(exceptions.Conflict) as exc:  # read-modify-write with a stale etag
        client.set_iam_policy(request={"resource": secret.name, "policy": {"bindings": [], "etag": empty.etag}})
    assert status_of(exc.value) == "ABORTED"
    with pytest.raises(exceptions.BadRequest):
        client.set_iam_policy(request={"resource": secret.name,
                                       "policy": {"bindings": [{"role": "roles/x", "members": ["x@y"]}]}})


def test_requires_bearer_token(emulator, world):
    response = requests.get(f"{emulator.url}/v1/{PARENT}/secrets")
    assert response.status_code == 401
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"
    # The client with a wrong token gets the 401, then fails to refresh a bare access token.
    with pytest.raises(RefreshError):
        list(make_client(emulator.url, "ya29.wrong").list_secrets(parent=PARENT))


def test_fail_next(client, emulator):
    emulator.put("flaky", b"data")
    name = f"{PARENT}/secrets/flaky/versions/latest"
    emulator.fail_next("secrets.versions.access", 503)
    with pytest.raises(exceptions.ServiceUnavailable):
        client.access_secret_version(name=name, retry=None)
    assert client.access_secret_version(name=name, retry=None).payload.data == b"data"

    emulator.fail_next("secrets.versions.access", 503)  # the client's default retry rides it out
    assert client.access_secret_version(name=name).payload.data == b"data"

    emulator.fail_next("secrets.versions.add", 500, count=2)
    for _ in range(2):
        with pytest.raises(exceptions.InternalServerError):
            add(client, "flaky", b"more")
    with pytest.raises(ApiError):
        emulator.fail_next("secrets.nope", 503)


def test_python_helpers(client, emulator):
    first = emulator.put("ca-cert", b"PEM1", labels={"meshjoin-role": "plugin-ca"})
    assert first == f"{NUMBERED}/secrets/ca-cert/versions/1"
    assert emulator.put("ca-cert", b"PEM2").endswith("/versions/2")
    assert emulator.access("ca-cert") == b"PEM2"
    assert emulator.access("ca-cert", "1") == b"PEM1"
    assert client.get_secret(name=f"{PARENT}/secrets/ca-cert").labels == {"meshjoin-role": "plugin-ca"}
    client.disable_secret_version(name=f"{PARENT}/secrets/ca-cert/versions/2")
    with pytest.raises(ApiError) as exc:
        emulator.access("ca-cert")
    assert exc.value.status == 400
    with pytest.raises(ApiError) as exc:
        emulator.access("missing")
    assert exc.value.status == 404
