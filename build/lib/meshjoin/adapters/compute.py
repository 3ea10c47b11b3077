"""Compute Engine: read VMs, write their metadata with the fingerprint. Returns `Vm`, never SDK types.

`retry.call` is the one retry policy, so a failing API costs a bounded number of attempts. Every call
passes `timeout` (MESHJOIN_API_TIMEOUT; the client library's default for Compute was 600 s per call), so
a hung call cannot hold the function past Pub/Sub's ack deadline.

Reads (`instances.get`, `getGuestAttributes`, the listing) are plain JSON over one authorized `requests`
session, not through `google.cloud.compute_v1`: its REST transport converts each answer to protobuf through
`json_format` (a regex over every string of an instance's metadata), about two thirds of the event
function's CPU per join (py-spy, issue 16), and the listing needs a partial response it cannot ask for.
Their errors are the REST API's own (`from_http_response` raises the same `google.api_core` exceptions the
library raises). Writes (`setMetadata` and waiting on its operation) go through google-cloud-compute's
client, whose types carry the fingerprint and the operation's status.
"""

from __future__ import annotations

import json
import threading
import time
from functools import cached_property
from typing import Iterator, Mapping, Protocol

from .. import names
from ..errors import StaleFingerprint, TransientError
from ..logs import log
from ..model import Vm, VmKey
from ..policy import PORTS_METADATA
from ..settings import Settings
from . import ratelimit
from .retry import call


# Metadata values at least this long are kept once per listing however many VMs carry them.
SHARED_VALUE_BYTES = 1024
# What the sweep's listing keeps of each VM's metadata: the items the planner reads (plan_sweep,
# fleet_rows): the status, the served ports (policy), and whether a legacy per-VM secret is named. The
# rest (certificate chain, bootstrap items, the startup script) is dropped as each page is read, so a
# 100,000-VM inventory holds ~1 kB per VM; such a Vm says `metadata_complete=False`, and the reconcile
# reads the VM whole before it decides anything for it.
SWEEP_METADATA_KEYS = frozenset({names.STATUS_KEY, PORTS_METADATA, names.SECRET_KEY})
# The listing's partial response (the `fields` system parameter): only what `vm_from_json` reads, plus
# what paging and partial success need. `nextPageToken` must be named, or a masked answer drops it and
# the listing would silently stop after one page.
LISTING_FIELDS = ("nextPageToken,unreachables,items/*/warning/code,"
                  "items/*/instances(name,id,status,labels,metadata(fingerprint,items),"
                  "networkInterfaces/networkIP,serviceAccounts/email)")
# zoneOperations.wait holds the request up to ~2 minutes server-side ("waits for no more than the
# default deadline (2 minutes) and then returns the current state of the operation, which might be
# DONE or still in progress", Compute API reference): the client deadline must exceed that, or
# every slow operation would look like a hung call.
OPERATION_WAIT_TIMEOUT = 150.0
# How long a setMetadata may stay unfinished before the pass gives up (transient: redelivered).
OPERATION_PATIENCE = 240.0
# The guest-attribute namespace meshjoin's agent reports in (and hands in its CSR).
GUEST_NAMESPACE = names.GUEST_NAMESPACE


class Compute(Protocol):
    """What the core asks of Compute Engine: `ComputeAdapter` here, `compute_fake.FakeCompute` in tests.

    tests/unit/test_ports.py holds both to these signatures, parameter by parameter.
    """

    def get_vm(self, key: VmKey) -> Vm | None: ...

    def list_vms(self, label_filter: str, *, project: str | None = None, unreachable: set[str] | None = None,
                 page_size: int = 500, metadata_keys: frozenset[str] | None = SWEEP_METADATA_KEYS) -> Iterator[Vm]: ...

    def guest_attributes(self, key: VmKey) -> dict[str, str]: ...

    def project_metadata(self, project: str | None = None) -> dict[str, str]: ...

    def find(self, name: str, project: str | None = None) -> list[Vm]: ...

    def set_metadata(self, vm: Vm, items: Mapping[str, str], remove: frozenset[str] = frozenset()) -> None: ...


class ComputeAdapter:
    def __init__(self, settings: Settings, credentials):
        self._settings = settings
        self._credentials = credentials
        self._json_session = None  # for listings (see list_vms)
        self._timeout = settings.api_timeout.total_seconds()
        self._limiters = ratelimit.shared_limiters(settings)
        # Common instance metadata per VM project: (items, when read).
        self._project_metadata: dict[str, tuple[dict[str, str], float]] = {}
        self._project_lock = threading.Lock()

    # The write path (setMetadata and its operation) goes through google-cloud-compute's client, built on
    # first use: a sweep or a read-only pass never pays its import (~1 s, ~100 MB). Reads, which are most
    # calls and carry whole instances, are plain JSON (see the module docstring).
    @cached_property
    def _compute_v1(self):
        from google.cloud import compute_v1

        return compute_v1

    def _client_kwargs(self) -> dict:
        options = {"api_endpoint": self._settings.compute_endpoint} if self._settings.compute_endpoint else None
        return dict(transport="rest", credentials=self._credentials, client_options=options)

    @cached_property
    def _instances(self):
        return self._compute_v1.InstancesClient(**self._client_kwargs())

    @cached_property
    def _operations(self):
        # Built with the same endpoint: the client's own operation polling would ignore it.
        return self._compute_v1.ZoneOperationsClient(**self._client_kwargs())

    def _call(self, fn, what: str, permission: str, passthrough=(), kind: str = ratelimit.READ,
              attempts: int | None = None):
        return call(fn, what=what, permission=permission, attempts=attempts or self._settings.api_attempts,
                    passthrough=passthrough, pace=lambda: self._limiters.acquire("compute", kind))

    def get_vm(self, key: VmKey) -> Vm | None:
        body = self._get_json(self._instance_url(key), {}, f"instances.get {key}", "compute.instances.get")
        return None if body is None else vm_from_json(key, body)

    def list_vms(self, label_filter: str, *, project: str | None = None, unreachable: set[str] | None = None,
                 page_size: int = 500, metadata_keys: frozenset[str] | None = SWEEP_METADATA_KEYS) -> Iterator[Vm]:
        """Every VM of `project` (default: MESHJOIN_PROJECT) matching `label_filter` (server-side), across
        zones, a page at a time (Compute's maximum, 500 a page).

        The sweep's listing by default: each Vm's metadata holds only `metadata_keys` (the planner's items;
        `metadata_complete=False`); None keeps every item (`find`). Pages ask for a partial response
        (`LISTING_FIELDS`) and are read as plain JSON, not through compute_v1's types (its JSON-to-protobuf
        conversion scans every string with a regex). Repeated values (labels, accounts, zones, long shared
        metadata) are kept once per listing, and no page is held once its VMs are yielded.

        `returnPartialSuccess=true`: a zone the API cannot reach is named in the answer's
        `unreachables` (or as a scope whose `warning.code` is UNREACHABLE) instead of failing or
        silently missing from the listing; those zones are added to `unreachable`, so the caller
        knows which zones' VMs it did not see (and must neither prune nor re-join them).
        """
        import urllib3
        from google.api_core.exceptions import from_http_response

        project = project or self._settings.project
        url = f"{self._base_url()}/compute/v1/projects/{project}/aggregated/instances"
        params = {"filter": label_filter, "maxResults": page_size, "returnPartialSuccess": "true",
                  "fields": LISTING_FIELDS}
        shared: dict[str, str] = {}
        unreachable = set() if unreachable is None else unreachable

        def page() -> dict:
            # The answer is read in one call: requests' `.content` reads 10 kB at a time, twice the CPU
            # for a page of 500 VMs (~3 MB).
            with self._session().get(url, params=params, timeout=self._timeout, stream=True) as response:
                if response.status_code >= 400:
                    raise from_http_response(response)
                try:
                    raw = response.raw.read(decode_content=True)
                except urllib3.exceptions.HTTPError as exc:  # cut short or timed out: as requests' own read
                    raise TransientError(f"instances.aggregatedList: the answer broke off ({exc})") from exc
            return json.loads(raw)

        while True:
            body = self._call(page, "instances.aggregatedList", "compute.instances.list")
            unreachable.update(unreachable_zones(body))
            token = body.get("nextPageToken")
            scopes = body.get("items") or {}
            del body  # the page's VMs go as they are yielded
            while scopes:
                scope, scoped = scopes.popitem()
                zone = shared.setdefault(scope.rsplit("/", 1)[-1], scope.rsplit("/", 1)[-1])
                instances = (scoped or {}).get("instances") or []
                instances.reverse()
                while instances:
                    instance = instances.pop()
                    yield vm_from_json(VmKey(project, zone, instance["name"]), instance, shared, metadata_keys)
            if not token:
                return
            params["pageToken"] = token

    def guest_attributes(self, key: VmKey) -> dict[str, str]:
        """What the VM's agent reported under guest attributes `meshjoin/` (instances.getGuestAttributes).

        The API answers 404 when the namespace holds nothing yet (or guest attributes are disabled):
        that is "not confirmed", an empty dict. Values are the VM's own words: callers validate them.
        Values come back verbatim from the JSON answer: a multi-line PEM CSR (`csr`) keeps its newlines.
        """
        body = self._get_json(self._instance_url(key) + "/getGuestAttributes", {"queryPath": f"{GUEST_NAMESPACE}/"},
                              f"instances.getGuestAttributes {key}", "compute.instances.getGuestAttributes")
        if body is None:
            return {}
        return guest_items(body)

    def project_metadata(self, project: str | None = None) -> dict[str, str]:
        """A VM project's common instance metadata (projects.get; None: the host project), cached like
        the CA (`MESHJOIN_CA_CACHE`).

        meshjoin needs one fact from it: whether the project runs its own `startup-script` on every
        VM, which an instance-level one would silently replace. Each VM project has its own.
        """
        project = project or self._settings.project
        with self._project_lock:
            cached = self._project_metadata.get(project)
            if cached is not None and time.monotonic() - cached[1] < self._settings.ca_cache.total_seconds():
                return cached[0]
            body = self._get_json(f"{self._base_url()}/compute/v1/projects/{project}",
                                  {"fields": "commonInstanceMetadata"}, f"projects.get {project}",
                                  "compute.projects.get")
            if body is None:
                # Only a project that does not exist answers 404 (then every other call fails too, with
                # its own error); an emulator without projects.get does as well. No common metadata.
                log("WARNING", f"projects.get {project}: 404; assuming no common instance metadata",
                    outcome="assumed")
                body = {}
            items = (body.get("commonInstanceMetadata") or {}).get("items") or []
            metadata = {i["key"]: i.get("value", "") for i in items
                        if isinstance(i, dict) and isinstance(i.get("key"), str)}
            self._project_metadata[project] = (metadata, time.monotonic())
            return metadata

    def _get_json(self, url: str, params: dict, what: str, permission: str) -> dict | None:
        """GET a Compute REST resource the client library does not model well, with the adapter's
        retries and pacing; None for a 404."""
        from google.api_core.exceptions import NotFound, from_http_response

        def read() -> dict:
            response = self._session().get(url, params=params, timeout=self._timeout)
            if response.status_code >= 400:
                raise from_http_response(response)
            return response.json()

        try:
            return self._call(read, what, permission, passthrough=(NotFound,))
        except NotFound:
            return None

    def _base_url(self) -> str:
        endpoint = self._settings.compute_endpoint or "compute.googleapis.com"
        return (endpoint if "://" in endpoint else f"https://{endpoint}").rstrip("/")

    def _instance_url(self, key: VmKey) -> str:
        return f"{self._base_url()}/compute/v1/projects/{key.project}/zones/{key.zone}/instances/{key.instance}"

    def _post_json(self, url: str, body: dict | None, timeout: float) -> dict:
        from google.api_core.exceptions import from_http_response

        response = self._session().post(url, json=body, timeout=timeout)
        if response.status_code >= 400:
            raise from_http_response(response)
        return response.json()

    def _session(self):
        if self._json_session is None:
            from google.auth.transport.requests import AuthorizedSession
            from requests.utils import get_netrc_auth

            session = AuthorizedSession(self._credentials)
            if session.trust_env:
                # requests re-derives proxies, the CA bundle and ~/.netrc from the environment on every request
                # (scanning all of os.environ): ~10 % of a join's CPU. Every call goes to one endpoint, so what it
                # would find is derived once, for that endpoint, exactly as requests derives it, and kept.
                url = self._base_url()
                found = session.merge_environment_settings(url, {}, None, None, None)
                session.proxies.update(found["proxies"])
                session.verify, session.cert = found["verify"], found["cert"]
                session.auth = get_netrc_auth(url)
                session.trust_env = False
            self._json_session = session
        return self._json_session

    def find(self, name: str, project: str | None = None) -> list[Vm]:
        """VMs with this name, in any zone of `project`, or of every VM project when None (whole: every
        metadata item)."""
        projects = (project,) if project else self._settings.vm_projects
        return [vm for p in projects for vm in self.list_vms(f'name = "{name}"', project=p, metadata_keys=None)]

    def set_metadata(self, vm: Vm, items: Mapping[str, str], remove: frozenset[str] = frozenset()) -> None:
        """Write `items` and drop `remove` keys, keeping the owner's other items; 412 → StaleFingerprint."""
        from google.api_core.exceptions import PreconditionFailed

        if not vm.metadata_complete:  # the merge below would drop every item the listing left out
            raise ValueError(f"{vm.key}: a listing's partial view of the metadata cannot be written back")

        merged = {k: v for k, v in vm.metadata.items() if k not in remove}
        merged.update(items)
        body = self._compute_v1.Metadata(
            fingerprint=vm.metadata_fingerprint,
            items=[self._compute_v1.Items(key=k, value=v) for k, v in merged.items()],
        )
        key = vm.key
        try:
            operation = self._call(
                lambda: self._instances.set_metadata_unary(
                    project=key.project, zone=key.zone, instance=key.instance, metadata_resource=body, retry=None,
                    timeout=self._timeout),
                f"instances.setMetadata {key}", "compute.instances.setMetadata",
                passthrough=(PreconditionFailed,), kind=ratelimit.WRITE)
        except PreconditionFailed as exc:
            raise StaleFingerprint(str(key)) from exc
        self._wait(key, operation.name)

    def _wait(self, key: VmKey, operation: str, patience: float = OPERATION_PATIENCE) -> None:
        """Until the operation is DONE: `wait` calls whose client deadline exceeds the server's ~2 min
        hold, repeated (a wait may return early, still RUNNING) until `patience` runs out."""
        deadline = time.monotonic() + patience
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            timeout = max(self._timeout, min(OPERATION_WAIT_TIMEOUT, deadline - time.monotonic() + 1))
            try:
                result = self._call(
                    lambda: self._operations.wait(project=key.project, zone=key.zone, operation=operation,
                                                  retry=None, timeout=timeout),
                    f"zoneOperations.wait {operation}", "compute.zoneOperations.get", attempts=1)
            except TransientError as exc:  # a lost answer: ask again while patience lasts
                last_error = exc
                time.sleep(1.0)
                continue
            if result.status == self._compute_v1.Operation.Status.DONE:
                if result.error and result.error.errors:
                    raise TransientError(f"operation {operation} on {key} failed: {result.error.errors[0].message}")
                return
        raise TransientError(f"operation {operation} on {key} did not finish within {patience:.0f}s"
                             + (f" ({last_error})" if last_error else ""))


def unreachable_zones(body: dict) -> set[str]:
    """Zones an aggregatedList page could not reach: `unreachables` and scopes warned UNREACHABLE."""
    zones = {str(scope).rsplit("/", 1)[-1] for scope in body.get("unreachables") or []}
    for scope, scoped in (body.get("items") or {}).items():
        warning = (scoped or {}).get("warning") or {}
        if warning.get("code") == "UNREACHABLE":
            zones.add(scope.rsplit("/", 1)[-1])
    return zones


def guest_items(body: dict) -> dict[str, str]:
    """`{key: value}` of the meshjoin namespace from a getGuestAttributes answer (queryPath form)."""
    items = ((body or {}).get("queryValue") or {}).get("items") or []
    return {item["key"]: item["value"] for item in items
            if isinstance(item, dict) and item.get("namespace") == GUEST_NAMESPACE
            and isinstance(item.get("key"), str) and isinstance(item.get("value"), str)}


def vm_from_json(key: VmKey, instance: dict, shared: dict[str, str] | None = None,
                 metadata_keys: frozenset[str] | None = None) -> Vm:
    """A `Vm` from an Instance as the REST API's JSON. Values equal to one in `shared` reuse it: metadata
    values of SHARED_VALUE_BYTES or more, labels, the account and the status (a listing repeats them).
    `metadata_keys`: keep only these metadata items (the Vm says `metadata_complete=False`); None: all."""
    shared = {} if shared is None else shared
    intern = shared.setdefault

    metadata = instance.get("metadata") or {}
    items = metadata.get("items") or []
    if metadata_keys is not None:
        kept = {item["key"]: item.get("value", "") for item in items if item.get("key") in metadata_keys}
    else:
        kept = {}
        for item in items:
            text = item.get("value", "")
            kept[item["key"]] = intern(text, text) if len(text) >= SHARED_VALUE_BYTES else text
    interfaces = instance.get("networkInterfaces") or []
    accounts = instance.get("serviceAccounts") or []
    account = accounts[0].get("email", "") if accounts else None
    return Vm(
        key=key,
        instance_id=str(instance.get("id", "")),
        labels={intern(k, k): intern(v, v) for k, v in (instance.get("labels") or {}).items()},
        metadata=kept,
        metadata_fingerprint=metadata.get("fingerprint", ""),
        network_ip=interfaces[0].get("networkIP", "") if interfaces else "",
        service_account=intern(account, account) if account else account,
        status=intern(instance.get("status", ""), instance.get("status", "")),
        metadata_complete=metadata_keys is None,
    )
