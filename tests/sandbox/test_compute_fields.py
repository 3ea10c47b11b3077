"""Partial responses from the Compute emulator (`fields`, `$fields`, `X-Goog-FieldMask`), as Google serves
them, and the product's sweep listing, which asks for one, read through them."""

from __future__ import annotations

import pytest
import requests
from google.oauth2.credentials import Credentials

from meshjoin import names
from meshjoin.adapters.compute import LISTING_FIELDS, SWEEP_METADATA_KEYS, ComputeAdapter
from meshjoin.errors import ApiPermissionError
from meshjoin.settings import Settings

from .test_compute import JOINED, OTHER_ZONE, ZONE, fleet, gce, server  # noqa: F401 - fixtures


def aggregated(gce, **params) -> requests.Response:
    return requests.get(f"{gce.url}/compute/v1/projects/{gce.project}/aggregated/instances", params=params,
                        headers={"Authorization": f"Bearer {gce.world.admin_token}", **params.pop("headers", {})},
                        timeout=10)


def listed(body: dict) -> list[dict]:
    return [i for scoped in body.get("items", {}).values() for i in scoped.get("instances", [])]


def test_a_mask_keeps_only_the_selected_fields_of_every_listed_vm(fleet):
    answer = aggregated(fleet, filter="labels.mesh=join", fields="items/*/instances(name,labels),nextPageToken")
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"items", "nextPageToken"} or set(body) == {"items"}  # no kind, id, selfLink
    vms = listed(body)
    assert sorted(vm["name"] for vm in vms) == sorted(JOINED + ["joined-b"])
    assert all(set(vm) == {"name", "labels"} for vm in vms)
    # Scopes are map keys: `items/*` selects within each; a scope's warning was not asked for.
    assert all(set(scoped) <= {"instances"} for scoped in body["items"].values())


def test_paging_goes_on_only_when_the_mask_names_next_page_token(fleet):
    names_seen, token, pages = [], None, 0
    while True:
        body = aggregated(fleet, filter="labels.mesh=join", maxResults=3, fields="nextPageToken,items/*/instances/name",
                          **({"pageToken": token} if token else {})).json()
        pages += 1
        names_seen += [vm["name"] for vm in listed(body)]
        token = body.get("nextPageToken")
        if not token:
            break
    assert pages == 3 and sorted(names_seen) == sorted(JOINED + ["joined-b"])
    # Google drops what the mask does not name, the token included: such a caller sees one page only.
    first = aggregated(fleet, filter="labels.mesh=join", maxResults=3, fields="items/*/instances/name").json()
    assert "nextPageToken" not in first and len(listed(first)) == 3


@pytest.mark.parametrize("how", ["$fields", "header"])
def test_the_mask_may_come_as_dollar_fields_or_the_field_mask_header(fleet, how):
    mask = "items/*/instances(name,status)"
    answer = aggregated(fleet, filter="labels.mesh=join", **(
        {"$fields": mask} if how == "$fields" else {"headers": {"X-Goog-FieldMask": mask}}))
    vms = listed(answer.json())
    assert len(vms) == 8 and all(set(vm) == {"name", "status"} for vm in vms)


@pytest.mark.parametrize("mask, named", [
    ("items/*/instances(nam)", "nam"),          # a typo
    ("items/*/instances/Name", "Name"),         # names are case-sensitive
    ("pageToken,items/*/instances/name", "pageToken"),  # the request's parameter, not the answer's field
    ("items/*/instances/metadata/items/kee", "kee"),
    ("items/*/instances(name", "instances(name"),  # syntax
])
def test_a_field_the_resource_does_not_have_is_refused_as_google_refuses_it(fleet, mask, named):
    answer = aggregated(fleet, fields=mask)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"].startswith("Invalid field selection") and named in error["message"]
    assert error["errors"][0]["reason"] == "invalidParameter"


def test_get_and_projects_get_honour_the_mask(gce):
    gce.emulator.seed_instance(ZONE, "vm-1", labels={"mesh": "join"}, metadata={"a": "1"})
    base = f"{gce.url}/compute/v1/projects/{gce.project}"
    auth = {"Authorization": f"Bearer {gce.world.admin_token}"}
    vm = requests.get(f"{base}/zones/{ZONE}/instances/vm-1", params={"fields": "name,metadata/fingerprint"},
                      headers=auth, timeout=10).json()
    assert set(vm) == {"name", "metadata"} and set(vm["metadata"]) == {"fingerprint"}
    project = requests.get(base, params={"fields": "commonInstanceMetadata"}, headers=auth, timeout=10).json()
    assert set(project) == {"commonInstanceMetadata"}


def adapter(gce) -> ComputeAdapter:
    settings = Settings(project=gce.project, cluster="projects/p/locations/r/clusters/c", compute_endpoint=gce.url)
    return ComputeAdapter(settings, Credentials(gce.world.admin_token))


def test_the_sweeps_listing_reads_every_vm_through_its_mask_page_by_page(fleet):
    status = '{"state": "joined"}'
    for n in range(8, 13):  # VMs with the items a joined VM carries, and some the listing must drop
        fleet.emulator.seed_instance(OTHER_ZONE, f"joined-{n}", labels={"mesh": "join"}, service_account="a@x",
                                     metadata={names.STATUS_KEY: status, "mesh-ports": "http:8080",
                                               names.CERT_CHAIN_KEY: "chain", "startup-script": "stub"})
    unreachable: set[str] = set()
    vms = list(adapter(fleet).list_vms("labels.mesh=join", page_size=4, unreachable=unreachable))
    assert sorted(vm.key.instance for vm in vms) == sorted(JOINED + ["joined-b"] + [f"joined-{n}" for n in range(8, 13)])
    assert not unreachable
    carrying = [vm for vm in vms if vm.key.instance == "joined-9"][0]
    assert carrying.metadata == {names.STATUS_KEY: status, "mesh-ports": "http:8080"}
    assert set(carrying.metadata) <= SWEEP_METADATA_KEYS and not carrying.metadata_complete
    assert carrying.service_account == "a@x" and carrying.network_ip and carrying.instance_id and \
        carrying.metadata_fingerprint and carrying.key.zone == OTHER_ZONE and carrying.status == "RUNNING"
    # `find` reads the VM whole.
    whole = adapter(fleet).find("joined-9")
    assert len(whole) == 1 and whole[0].metadata_complete and whole[0].metadata[names.CERT_CHAIN_KEY] == "chain"


def test_the_sweeps_mask_is_one_the_api_accepts(fleet):
    assert aggregated(fleet, fields=LISTING_FIELDS).status_code == 200


def test_a_zone_left_out_of_a_masked_listing_is_still_reported_unreachable(fleet):
    fleet.emulator.faults.add({"method": "instances.aggregatedList", "kind": "partial", "zone": OTHER_ZONE})
    unreachable: set[str] = set()
    vms = list(adapter(fleet).list_vms("labels.mesh=join", unreachable=unreachable))
    assert unreachable == {OTHER_ZONE} and sorted(vm.key.instance for vm in vms) == JOINED


def test_a_listing_that_fails_is_retried_then_raised(fleet):
    fleet.emulator.fail_next("instances.aggregatedList", 503, count=1)
    assert len(list(adapter(fleet).list_vms("labels.mesh=join"))) == 8  # one retry
    fleet.emulator.fail_next("instances.aggregatedList", 403, count=1)
    with pytest.raises(ApiPermissionError, match="compute.instances.list"):
        list(adapter(fleet).list_vms("labels.mesh=join"))


def test_pages_follow_inserts_and_deletes_made_between_them(fleet):
    """The emulator keeps the listing order between pages: a VM made or deleted meanwhile shows (or not) on
    the pages still to come, as a cursor over names does."""
    first = aggregated(fleet, filter="labels.mesh=join", maxResults=3, fields="nextPageToken,items/*/instances/name")
    body = first.json()
    assert [vm["name"] for vm in listed(body)] == JOINED[:3]
    fleet.emulator.seed_instance(ZONE, "joined-45", labels={"mesh": "join"})  # sorts after joined-4
    requests.delete(f"{fleet.url}/compute/v1/projects/{fleet.project}/zones/{ZONE}/instances/joined-5",
                    headers={"Authorization": f"Bearer {fleet.world.admin_token}"}, timeout=10).raise_for_status()
    rest, token = [], body["nextPageToken"]
    while token:
        page = aggregated(fleet, filter="labels.mesh=join", maxResults=3, pageToken=token,
                          fields="nextPageToken,items/*/instances/name").json()
        rest += [vm["name"] for vm in listed(page)]
        token = page.get("nextPageToken")
    assert rest == ["joined-4", "joined-45", "joined-6", "joined-7", "joined-b"]
