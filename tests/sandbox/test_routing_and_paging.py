"""The emulators' shared plumbing, in-process (no sockets): routes declared on handlers (web.route,
RoutedApp), the one fault injector every emulator consults, and paging.py's token codec and pages."""

from __future__ import annotations

import json

import pytest
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wrappers import Request

from meshjoin_sandbox.paging import (decode_key, decode_token, encode_key, encode_token, google_keyset_page,
                                     google_offset_page, keyset_page, kube_page)
from meshjoin_sandbox.web import (ApiError, FaultyEmulator, RoutedApp, injected_fault, json_response,
                                  matched_route, route)

THINGS = "/v1/projects/<project>/things"


class World:
    """Just enough world for the fault injector: no caller is the functions' account."""

    def principal_of(self, token):
        return None


class Things(FaultyEmulator):
    """A toy API: two paths for one getter, a collection, and a catch-all method."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.app = RoutedApp(self, before=self._before, strict_slashes=False)
        self.faults = self.app.inject_faults(World())

    def _before(self, request, endpoint):
        self.calls.append((endpoint, dict(request.url_args)))

    @route("GET", (THINGS + "/<thing>", "/v1/legacy/<project>/things/<thing>"), "things.get")
    def _get(self, request, project, thing):
        return json_response({"project": project, "thing": thing})

    @route("GET", THINGS, "things.list")
    def _list(self, request, project):
        fault = injected_fault(request)
        return json_response({"partial": fault is not None and fault.kind == "partial"})

    @route("POST", THINGS, "things.create")
    @route("PUT", THINGS + "/<thing>", "things.create")
    def _create(self, request, project, thing="new"):
        return json_response({"created": thing})

    @route("*", "/anything", "anything")
    def _anything(self, request):
        return json_response({"method": request.method})


@pytest.fixture
def things():
    return Things()


def test_routes_declared_on_handlers_map_methods_and_paths_to_endpoints(things):
    client = Client(things.app)
    assert client.get("/v1/projects/p/things/t1").json == {"project": "p", "thing": "t1"}
    assert client.get("/v1/legacy/p/things/t2").json == {"project": "p", "thing": "t2"}
    assert client.post("/v1/projects/p/things").json == {"created": "new"}
    assert client.put("/v1/projects/p/things/t3").json == {"created": "t3"}
    assert client.delete("/anything").json == {"method": "DELETE"}
    assert things.app.endpoints == ["things.get", "things.list", "things.create", "anything"]
    # `before` saw each call's path variables, matched once by the app
    assert things.calls[:2] == [("things.get", {"project": "p", "thing": "t1"}),
                                ("things.get", {"project": "p", "thing": "t2"})]


def test_unknown_paths_and_methods_are_rendered_by_the_apis_error_format(things):
    client = Client(things.app)
    missing = client.get("/v1/nowhere")
    assert missing.status_code == 404
    assert missing.json["error"]["message"] == "no such path: /v1/nowhere"
    refused = client.delete("/v1/projects/p/things/t1")
    assert refused.status_code == 405
    assert refused.json["error"]["message"] == "method DELETE not allowed on /v1/projects/p/things/t1"
    assert things.calls == []  # neither reached `before`


def test_the_matched_route_is_left_for_the_stats_counter(things):
    environ = EnvironBuilder(path="/v1/projects/p/things/t1").get_environ()
    things.app(environ, lambda status, headers: None)
    assert matched_route(environ) == ("things.get", {"project": "p", "thing": "t1"})
    unmatched = EnvironBuilder(path="/v1/nowhere").get_environ()
    things.app(unmatched, lambda status, headers: None)
    assert matched_route(unmatched) is None


def test_one_endpoint_routed_to_two_handlers_is_refused():
    class Confused:
        @route("GET", "/a", "same")
        def one(self, request):
            return json_response({})

        @route("GET", "/b", "same")
        def two(self, request):
            return json_response({})

    with pytest.raises(ValueError, match="'same' is routed to two handlers"):
        RoutedApp(Confused())


def test_every_emulator_consults_its_fault_injector_in_the_app(things):
    client = Client(things.app)
    things.fail_next("things.get", 503, count=2)
    assert [client.get("/v1/projects/p/things/t").status_code for _ in range(3)] == [503, 503, 200]
    things.faults.add({"method": "things.list", "kind": "partial"})
    assert client.get("/v1/projects/p/things").json == {"partial": True}  # the handler sees its fault
    assert client.get("/v1/projects/p/things").json == {"partial": False}
    assert things.faults.stats()["injected"] == {"things.get": {"error": 2}, "things.list": {"partial": 1}}
    with pytest.raises(ApiError, match="matches no method of this API"):
        things.fail_next("things.nope", 503)
    things.faults.add({"method": "things.*", "status": 429, "count": None})
    things.clear_faults()
    assert client.get("/v1/projects/p/things/t").status_code == 200


# --- paging.py -----------------------------------------------------------------------------------------


def request(query: str) -> Request:
    return Request(EnvironBuilder(query_string=query).get_environ())


def test_tokens_keep_the_bytes_the_emulators_always_wrote():
    """Compute's/Kubernetes' key tokens and Secret Manager's offsets, exactly as before the shared codec
    (captured from the emulators' answers at 096ecd2)."""
    assert encode_key(("us-central1-a", "vm-3")) == "WyJ1cy1jZW50cmFsMS1hIiwgInZtLTMiXQ=="
    assert encode_token(b"offset:2") == "b2Zmc2V0OjI="
    assert decode_key("WyJ1cy1jZW50cmFsMS1hIiwgInZtLTMiXQ==") == ("us-central1-a", "vm-3")
    assert decode_token("b2Zmc2V0OjI=") == b"offset:2"
    with pytest.raises(ValueError):
        decode_key("not a token")
    with pytest.raises((ValueError, TypeError)):
        decode_key(encode_token(json.dumps(["only-one"]).encode()))


ORDER = sorted([("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("b", "2"), ("c", "1")])


def walk(keep, limit, scope=None):
    """Every page of a listing, following each page's last key."""
    pages, after = [], None
    while True:
        page = keyset_page(ORDER, keep, limit=limit, scope=scope, after=after)
        pages.append(page.keys)
        if page.next_index is None:
            return pages
        after = page.keys[-1]


def test_keyset_pages_read_each_kept_key_once_in_order():
    assert walk(lambda key: True, 4) == [ORDER[:4], ORDER[4:]]
    assert walk(lambda key: key[1] != "2", 2) == [[("a", "1"), ("a", "3")], [("b", "1"), ("c", "1")]]
    assert walk(lambda key: True, 0) == [ORDER]  # no limit: one page
    assert walk(lambda key: True, 1, scope="b") == [[("b", "1")], [("b", "2")]]
    assert walk(lambda key: True, 5, scope="z") == [[]]


def test_a_page_counts_what_is_left_of_its_scope():
    first = keyset_page(ORDER, lambda key: True, limit=2)
    assert (first.keys, first.remaining) == ([("a", "1"), ("a", "2")], 4)
    scoped = keyset_page(ORDER, lambda key: True, limit=1, scope="a")
    assert scoped.remaining == 2
    assert keyset_page(ORDER, lambda key: True, limit=10).remaining == 0


def test_a_write_between_pages_neither_repeats_nor_skips_the_rest():
    first = keyset_page(ORDER, lambda key: True, limit=2)
    grown = sorted(ORDER + [("a", "0"), ("a", "25")])  # one before the cursor, one after it
    second = keyset_page(grown, lambda key: True, limit=10, after=first.keys[-1])
    assert second.keys == [("a", "25"), ("a", "3"), ("b", "1"), ("b", "2"), ("c", "1")]


def test_compute_dialect_maxresults_and_pagetoken():
    keys, token = google_keyset_page(request("maxResults=2"), ORDER, lambda key: True, max_results=500)
    assert keys == ORDER[:2] and decode_key(token) == ("a", "2")
    keys, token = google_keyset_page(request(f"maxResults=0&pageToken={token}"), ORDER, lambda key: True,
                                     max_results=3)
    assert keys == ORDER[2:5] and decode_key(token) == ("b", "2")
    assert google_keyset_page(request(f"pageToken={token}"), ORDER, lambda key: True, max_results=3) == \
        ([("c", "1")], None)
    for query, message in [
        ("maxResults=x", "Invalid value for field 'maxResults': 'x'."),
        ("maxResults=501", "Invalid value for field 'maxResults': '501'. Must be less than or equal to 500"),
        ("pageToken=garbage", "Invalid value for field 'pageToken': 'garbage'."),
    ]:
        with pytest.raises(ApiError) as refused:
            google_keyset_page(request(query), ORDER, lambda key: True, max_results=500)
        assert (refused.value.status, refused.value.message) == (400, message)


def test_secret_manager_dialect_pagesize_and_offsets():
    items = list(range(12))
    chunk, token = google_offset_page(items, request("pageSize=3"), max_page=5)
    assert (chunk, decode_token(token)) == ([0, 1, 2], b"offset:3")
    chunk, token = google_offset_page(items, request(f"pageSize=100&pageToken={token}"), max_page=5)
    assert (chunk, decode_token(token)) == ([3, 4, 5, 6, 7], b"offset:8")  # above the maximum: cut to it
    assert google_offset_page(items, request(f"pageToken={token}"), max_page=5) == ([8, 9, 10, 11], "")
    for query in ("pageSize=-1", "pageSize=x", "pageToken=garbage",
                  "pageToken=" + encode_token(b"offset:-3")):
        with pytest.raises(ApiError) as refused:
            google_offset_page(items, request(query), max_page=5)
        assert (refused.value.status, refused.value.reason) == (400, "INVALID_ARGUMENT")


def test_kubernetes_dialect_limit_and_continue():
    keys, token, remaining = kube_page(request("limit=4"), ORDER, lambda key: True)
    assert (keys, decode_key(token), remaining) == (ORDER[:4], ("b", "1"), 2)
    assert kube_page(request(f"limit=4&continue={token}"), ORDER, lambda key: True) == (ORDER[4:], None, 0)
    assert kube_page(request(""), ORDER, lambda key: True, scope="a") == (ORDER[:3], None, 0)
    with pytest.raises(ApiError) as refused:
        kube_page(request("limit=x"), ORDER, lambda key: True)
    assert (refused.value.status, refused.value.message, refused.value.reason) == \
        (400, "limit must be an integer", "BadRequest")
    with pytest.raises(ApiError) as refused:
        kube_page(request("continue=garbage"), ORDER, lambda key: True)
    assert refused.value.message.startswith("continue key is not valid: ")


def test_the_real_emulators_suffer_faults_through_their_app():
    """Compute's and Secret Manager's fault methods are exactly their routed API methods."""
    from meshjoin_sandbox.compute import PERMISSIONS, ComputeEmulator
    from meshjoin_sandbox.secretmanager import SecretManagerEmulator
    from meshjoin_sandbox.world import World as SandboxWorld

    world = SandboxWorld()
    for emulator in (ComputeEmulator(world), SecretManagerEmulator(world)):
        assert emulator.app.faults is emulator.faults
        assert emulator.faults.methods() == emulator.app.endpoints
    assert set(world.emulators["compute"].app.endpoints) == set(PERMISSIONS)
