"""Compute Engine v1 emulator: the instances and zoneOperations calls meshjoin makes, over REST.

The unmodified google-cloud-compute REST transport talks to it through
`client_options={"api_endpoint": "http://127.0.0.1:PORT"}`. It keeps real GCE's sharp edges the
product must cope with: fingerprints on labels and metadata (412 when stale), operations that are
still RUNNING when the mutation returns, paged listings, labels absent from audit entries, and the
Admin Activity audit entries (first + last) a Log Router sink would publish for insert, delete and
setLabels.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import re
import secrets
import threading
from datetime import datetime, timedelta, timezone

from . import fieldmask
from .guest import GuestAttributes
from .iam import check_scopes
from .lifecycle import OperationClock, VmLifecycle
from .quota import compute_quotas, limiter
from .paging import google_keyset_page, with_next_page_token
from .web import (GOOGLE_STATUS, ApiError, FaultyEmulator, RoutedApp, injected_fault, json_response, read_json,
                  route)

API = "https://www.googleapis.com/compute/v1"
# us-central1's zones: aggregatedList reports every zone of the project, empty ones with a warning.
ZONE_SUFFIXES = ("a", "b", "c", "f")
# The scopes gcloud gives a VM's service account by default.
DEFAULT_SCOPES = [
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
    "https://www.googleapis.com/auth/servicecontrol",
    "https://www.googleapis.com/auth/service.management.readonly",
    "https://www.googleapis.com/auth/trace.append",
]
MAX_RESULTS = 500
# Route templates (werkzeug syntax); each handler carries its routes (web.route).
PROJECT = "/compute/v1/projects/<project>"
INSTANCE = PROJECT + "/zones/<zone>/instances/<instance>"
ZONE_OPERATION = PROJECT + "/zones/<zone>/operations/<operation>"
# GCE's documented limits, so a product that writes too much metadata fails here as it would there.
METADATA_VALUE_LIMIT = 256 * 1024
METADATA_TOTAL_LIMIT = 512 * 1024
MAX_LABELS = 64

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_METADATA_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")
# Compute's error dialect: `errors[].reason` is a lowerCamel word per status.
_REASONS = {
    400: "invalid", 401: "authError", 403: "forbidden", 404: "notFound", 405: "badRequest",
    409: "alreadyExists", 412: "conditionNotMet", 429: "rateLimitExceeded",
}
_FILTER_TERM = re.compile(r'\s*([A-Za-z][\w.-]*)\s*(!=|=|:)\s*("(?:[^"\\]|\\.)*"|[^\s()"]+)\s*')
_FILTER_GROUP = re.compile(r"\s*(?:AND\s*)?\(([^()]*)\)\s*")
_FILTER_FIELDS = {"name", "status", "id", "zone", "machineType", "creationTimestamp", "labelFingerprint",
                  "cpuPlatform", "description", "selfLink"}
_AUDITED = {"insert", "delete", "setLabels", "stop", "start", "reset", "setServiceAccount"}


# The IAM permission each method needs, and on what: "instance", "zone" (the zone's collection),
# "project", or "operation". Compute's API reference lists them per method; e.g. instances.insert
# needs compute.instances.create (https://cloud.google.com/compute/docs/reference/rest/v1/instances).
PERMISSIONS: dict[str, tuple[str, str]] = {
    "instances.aggregatedList": ("compute.instances.list", "project"),
    "instances.list": ("compute.instances.list", "zone"),
    "instances.insert": ("compute.instances.create", "zone"),
    "instances.get": ("compute.instances.get", "instance"),
    "instances.delete": ("compute.instances.delete", "instance"),
    "instances.setLabels": ("compute.instances.setLabels", "instance"),
    "instances.setMetadata": ("compute.instances.setMetadata", "instance"),
    "instances.getGuestAttributes": ("compute.instances.getGuestAttributes", "instance"),
    "instances.start": ("compute.instances.start", "instance"),
    "instances.stop": ("compute.instances.stop", "instance"),
    "instances.reset": ("compute.instances.reset", "instance"),
    "instances.setServiceAccount": ("compute.instances.setServiceAccount", "instance"),
    "zoneOperations.get": ("compute.zoneOperations.get", "operation"),
    "zoneOperations.wait": ("compute.zoneOperations.get", "operation"),
    "projects.get": ("compute.projects.get", "project"),
    "projects.setCommonInstanceMetadata": ("compute.projects.setCommonInstanceMetadata", "project"),
    "globalOperations.get": ("compute.globalOperations.get", "globalOperation"),
    "globalOperations.wait": ("compute.globalOperations.get", "globalOperation"),
}
_READS = {"instances.aggregatedList", "instances.list", "instances.get", "instances.getGuestAttributes",
          "zoneOperations.get", "zoneOperations.wait", "projects.get", "globalOperations.get",
          "globalOperations.wait"}


def render_error(err: ApiError):
    """Compute's flavour of the Google JSON error (api_core maps the HTTP status to an exception)."""
    body = {
        "error": {
            "code": err.status,
            "message": err.message,
            "status": GOOGLE_STATUS.get(err.status, "UNKNOWN"),
            "errors": [{"message": err.message, "domain": "global",
                        "reason": getattr(err, "error_reason", None) or _compute_reason(err)}],
        }
    }
    if isinstance(err.details, list):
        body["error"]["details"] = err.details
    return json_response(body, err.status)


def _compute_reason(err: ApiError) -> str:
    """An explicit lowerCamel reason (rateLimitExceeded, resourceNotReady) wins over the status's."""
    if err.reason and err.reason[:1].islower():
        return err.reason
    return _REASONS.get(err.status, "backendError")


def _fingerprint() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


def _same_fingerprint(given, current: str) -> bool:
    """Fingerprints are `bytes` fields: clients may send them back in standard or URL-safe base64
    (gcloud's apitools re-encodes URL-safe), so compare the bytes, as the real API does."""
    if not isinstance(given, str) or not given:
        return False

    def raw(text: str) -> bytes | None:
        try:
            return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except ValueError:
            return None

    decoded = raw(given)
    return decoded is not None and decoded == raw(current)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _gce_time(when: datetime) -> str:
    """GCE's resource timestamps: millisecond RFC 3339 in Pacific-style local offset."""
    return when.astimezone(timezone(timedelta(hours=-7))).isoformat(timespec="milliseconds")


def _log_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


class _Term:
    """One `field op value` comparison of a Compute list filter."""

    def __init__(self, text: str):
        match = _FILTER_TERM.fullmatch(text)
        if match is None:
            raise ApiError(400, f"Invalid value for field 'filter': '{text}'. Invalid list filter expression.")
        self.field, self.op, raw = match.groups()
        self.has_any = self.op == ":" and raw == "*"
        self.value = _unquote(raw)
        if not (self.field in _FILTER_FIELDS or (self.field.startswith("labels.") and len(self.field) > 7)):
            raise ApiError(400, f"Invalid value for field 'filter': '{text}'. Invalid field name '{self.field}'.")

    def matches(self, instance: dict) -> bool:
        if self.field.startswith("labels."):
            actual = instance.get("labels", {}).get(self.field[7:])
        else:
            actual = instance.get(self.field)
        if self.has_any:
            return actual is not None
        if self.op == ":":
            return actual is not None and self.value in str(actual)
        equal = actual is not None and str(actual) == self.value
        return equal if self.op == "=" else not equal


def parse_filter(text: str) -> list[_Term]:
    """A conjunction of terms: one bare term, or parenthesised terms optionally joined by AND."""
    text = text.strip()
    if not text:
        return []
    if not text.startswith("("):
        return [_Term(text)]
    terms, pos = [], 0
    while pos < len(text):
        match = _FILTER_GROUP.match(text, pos)
        if match is None:
            raise ApiError(400, f"Invalid value for field 'filter': '{text}'. "
                                "Only an AND of parenthesised terms is supported.")
        terms.append(_Term(match.group(1)))
        pos = match.end()
    return terms


def _check_labels(labels: dict) -> None:
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise ApiError(400, "Invalid value for field 'labels': at most 64 labels are allowed.")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key) or not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ApiError(400, f"Invalid value for field 'labels': '{key}={value}'. Label keys and values "
                                "must be lowercase letters, digits, '_' or '-' (keys start with a letter, <= 63).")


def _not_found(path: str) -> ApiError:
    return ApiError(404, f"The resource '{path}' was not found")


def _metadata_items(metadata: dict) -> list[dict]:
    """The `items` of a Metadata body, checked against GCE's key syntax and size limits."""
    items = [{"key": i.get("key", ""), "value": i.get("value", "")} for i in metadata.get("items", [])]
    seen, total = set(), 0
    for index, item in enumerate(items):
        key, value = item["key"], item["value"]
        if not _METADATA_KEY.fullmatch(key):
            raise ApiError(400, f"Invalid value for field 'metadata.items[{index}].key': '{key}'.")
        if key in seen:
            raise ApiError(400, f"Invalid value for field 'metadata.items[{index}].key': duplicate key '{key}'.")
        seen.add(key)
        size = len(value.encode())
        if size > METADATA_VALUE_LIMIT:
            raise ApiError(400, f"Value for field 'metadata.items[{index}].value' is too large: {size} bytes "
                                f"(maximum {METADATA_VALUE_LIMIT}).")
        total += size + len(key)
    if total > METADATA_TOTAL_LIMIT:
        raise ApiError(400, f"Metadata is too large: {total} bytes in total (maximum {METADATA_TOTAL_LIMIT}).")
    return items


class ComputeEmulator(FaultyEmulator):
    """Instances and zonal operations of one project, kept in memory under `world.lock`.

    One emulator per sandbox project (`project`, default the host `world.project`), each with its own
    project number, VMs, common metadata, quotas, default compute account, subnetwork and faults;
    `ComputeProjects` serves them all on one endpoint, routed by the project in the path."""

    def __init__(self, world, subnet: str = "10.128.0.0/20", project: str | None = None):
        self.world = world
        self.project = project or world.project
        self.project_number = world.number_of(self.project)
        self._instances: dict[tuple[str, str], dict] = {}
        # Listing order (zone, name) and the zones holding VMs, rebuilt after an insert or a delete only:
        # a 100,000-VM listing is 200 pages, and each page must not sort or scan the whole fleet again.
        self._order: list[tuple[str, str]] | None = None
        self._zones_in_use: set[str] = set()
        self._operations: dict[tuple[str, str], dict] = {}
        self._subnet = ipaddress.ip_network(subnet)
        # The first two and last two addresses of a GCE subnet are reserved.
        self._ip_first = int(self._subnet.network_address) + 2
        self._ip_count = self._subnet.num_addresses - 4
        self._ip_next = 0
        self._ips_in_use: set[str] = set()
        self._next_id = 10**18 + secrets.randbelow(8 * 10**18)
        self.app = RoutedApp(self, render_error=render_error, before=self._before)
        self.faults = self.app.inject_faults(world)
        # The host's is "compute" (what the rest of the sandbox and its tests use); another project's
        # "compute@PROJECT" (`sandbox fault --emulator compute@meshjoin-sandbox-2` reaches it).
        world.emulators["compute" if self.project == world.project else f"compute@{self.project}"] = self
        self._init_lifecycle()

    def _init_lifecycle(self) -> None:
        """Boot timing, operation timing, quotas, project metadata and guest attributes."""
        world = self.world
        self.lifecycle = VmLifecycle(self, world.timing, on_boot=self._booted)
        self.op_clock = OperationClock(world.timing)
        self.quotas = compute_quotas(world.timing.time_factor)
        self.app.limiter = limiter(self.quotas, self, 403, "rateLimitExceeded")  # charged to this project
        self.guest_attributes = GuestAttributes(world.timing.time_factor)
        self._project_metadata = {"kind": "compute#metadata", "fingerprint": _fingerprint(), "items": []}
        self._pending_last: dict[tuple[str, str], list[dict]] = {}

    @property
    def default_compute_sa(self) -> str:
        return f"{self.project_number}-compute@developer.gserviceaccount.com"

    @property
    def guests(self):
        """This project's guests (guest.py), if the world runs any."""
        return self.world.emulators.get("guests" if self.project == self.world.project else f"guests@{self.project}")

    def _booted(self, zone: str, name: str) -> None:
        """The guest's boot: its startup script runs now, and only now (guest.py)."""
        guests = self.guests
        if guests is not None:
            guests.boot(zone, name)

    def _halted(self, zone: str, name: str) -> None:
        """The guest goes down (stop, reset, delete): whatever runs in it ends (guest.py)."""
        guests = self.guests
        if guests is not None:
            guests.halt(zone, name)

    def stamp(self) -> str:
        return _gce_time(_now())

    def project_metadata(self) -> dict:
        with self.world.lock:
            return copy.deepcopy(self._project_metadata)

    def metadata_value(self, zone: str, name: str, key: str) -> str | None:
        """An attribute as GCE's guest sees it: the instance item, else the project (common) item."""
        with self.world.lock:
            instance = self._instances.get((zone, name))
            for items in ((instance or {}).get("metadata", {}).get("items", []), self._project_metadata["items"]):
                for item in items:
                    if item["key"] == key:
                        return item["value"]
        return None

    # ---- Python access for tests, tools and the other emulators --------------------------------------

    def instance(self, zone: str, name: str) -> dict | None:
        with self.world.lock:
            found = self._instances.get((zone, name))
            return copy.deepcopy(found) if found is not None else None

    def instances(self) -> list[dict]:
        with self.world.lock:
            return [copy.deepcopy(self._instances[key]) for key in sorted(self._instances)]

    def seed_instance(self, zone: str, name: str, labels: dict | None = None, metadata: dict | None = None,
                      service_account: str | None = None) -> dict:
        """Create a VM directly, with no operation and no audit entry (benchmarks seed thousands)."""
        body = {
            "name": name,
            "labels": labels or {},
            "metadata": {"items": [{"key": k, "value": v} for k, v in (metadata or {}).items()]},
        }
        if service_account is not None:
            body["serviceAccounts"] = [{"email": service_account, "scopes": DEFAULT_SCOPES}]
        with self.world.lock:
            return copy.deepcopy(self._create(zone, body))

    # ---- request plumbing ----------------------------------------------------------------------------

    def _before(self, request, endpoint: str) -> None:
        """Authenticate (401), check the token's scopes, then IAM on the resource the method touches.

        Writes to a VM that runs as a service account (setMetadata; insert with an account) also
        need iam.serviceAccounts.actAs on that account, as GCE requires.
        """
        principal = self.world.authenticate(request)
        check_scopes(principal, "compute", f"compute.v1.{endpoint}", endpoint in _READS)
        if endpoint not in PERMISSIONS:
            raise ApiError(500, f"sandbox: no IAM permission is mapped for Compute method {endpoint}")
        permission, target = PERMISSIONS[endpoint]
        args = getattr(request, "url_args", {})
        project = f"projects/{args.get('project', self.project)}"
        resource = {
            "project": project,
            "zone": f"{project}/zones/{args.get('zone')}",
            "instance": f"{project}/zones/{args.get('zone')}/instances/{args.get('instance')}",
            "operation": f"{project}/zones/{args.get('zone')}/operations/{args.get('operation')}",
            "globalOperation": f"{project}/global/operations/{args.get('operation')}",
        }[target]
        iam = self.world.iam
        if endpoint == "instances.insert":  # named by the instance it would create
            resource += f"/instances/{read_json(request).get('name', '')}"
        iam.check(principal, permission, resource)
        accounts: list[str] = []
        if endpoint == "instances.insert":
            body = read_json(request)
            if body.get("metadata", {}).get("items"):
                iam.check(principal, "compute.instances.setMetadata", resource)
            if body.get("labels"):
                iam.check(principal, "compute.instances.setLabels", resource)
            accounts = [self.default_compute_sa if a.get("email") in (None, "", "default") else a["email"]
                        for a in body.get("serviceAccounts") or []]
        elif endpoint == "instances.setMetadata":
            found = self.instance(args.get("zone", ""), args.get("instance", ""))
            accounts = [a["email"] for a in (found or {}).get("serviceAccounts", [])]
        elif endpoint == "instances.setServiceAccount":  # actAs on the account the VM will run as
            email = self._requested_account(read_json(request))
            accounts = [email] if email else []
        for email in accounts:
            # IAM checks actAs on the account itself, in the project it belongs to (a VM may run as an
            # account of another project), not on the VM's project.
            iam.check(principal, "iam.serviceAccounts.actAs",
                      f"projects/{self.world.account_project(email)}/serviceAccounts/{email}")

    def _check_scope(self, project: str, zone: str | None = None) -> None:
        if project != self.project:
            raise ApiError(404, f"The resource 'projects/{project}' was not found")
        if zone is not None and not _ZONE.fullmatch(zone):
            raise ApiError(400, f"Invalid value for field 'zone': '{zone}'. Unknown zone.")

    def _principal(self, request) -> str:
        """The caller's email, as the audit log's authenticationInfo.principalEmail names it."""
        return self.world.authenticate(request).email

    def _zone_url(self, zone: str) -> str:
        return f"{API}/projects/{self.project}/zones/{zone}"

    def _must_get(self, zone: str, name: str) -> dict:
        found = self._instances.get((zone, name))
        if found is None:
            raise _not_found(f"projects/{self.project}/zones/{zone}/instances/{name}")
        return found

    # ---- instances -----------------------------------------------------------------------------------

    def _allocate_ip(self) -> str:
        for step in range(self._ip_count):
            index = (self._ip_next + step) % self._ip_count
            address = str(ipaddress.ip_address(self._ip_first + index))
            if address not in self._ips_in_use:
                self._ip_next = index + 1
                self._ips_in_use.add(address)
                return address
        raise ApiError(400, f"IP space of subnetwork '{self._subnet}' is exhausted.")

    def _create(self, zone: str, body: dict) -> dict:
        """Build and store the Instance resource GCE would report for an insert `body` (lock held)."""
        name = body.get("name", "")
        if not _NAME.fullmatch(name):
            raise ApiError(400, f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
        if (zone, name) in self._instances:
            path = f"projects/{self.project}/zones/{zone}/instances/{name}"
            raise ApiError(409, f"The resource '{path}' already exists")
        labels = dict(body.get("labels") or {})
        _check_labels(labels)
        items = _metadata_items(body.get("metadata") or {})
        project, region = self.project, zone.rsplit("-", 1)[0]
        machine_type = (body.get("machineType") or "e2-medium").rsplit("/", 1)[-1]
        nic = (body.get("networkInterfaces") or [{}])[0]
        network = (nic.get("network") or "default").rsplit("/", 1)[-1]
        subnetwork = (nic.get("subnetwork") or network).rsplit("/", 1)[-1]
        accounts = body.get("serviceAccounts") or [{}]
        now = _gce_time(_now())
        self._next_id += 1
        instance = {
            "kind": "compute#instance",
            "id": str(self._next_id),
            "creationTimestamp": now,
            "name": name,
            "tags": {"fingerprint": _fingerprint()},
            "machineType": f"{self._zone_url(zone)}/machineTypes/{machine_type}",
            "status": "RUNNING",
            "zone": self._zone_url(zone),
            "canIpForward": False,
            "networkInterfaces": [{
                "kind": "compute#networkInterface",
                "network": f"{API}/projects/{project}/global/networks/{network}",
                "subnetwork": f"{API}/projects/{project}/regions/{region}/subnetworks/{subnetwork}",
                "networkIP": self._allocate_ip(),
                "name": "nic0",
                "fingerprint": _fingerprint(),
                "stackType": "IPV4_ONLY",
            }],
            "disks": body.get("disks") or [],
            "metadata": {"kind": "compute#metadata", "fingerprint": _fingerprint(), "items": items},
            "serviceAccounts": [{
                "email": self.default_compute_sa if a.get("email") in (None, "", "default") else a["email"],
                "scopes": a.get("scopes") or DEFAULT_SCOPES,
            } for a in accounts],
            "selfLink": f"{self._zone_url(zone)}/instances/{name}",
            "scheduling": {"onHostMaintenance": "MIGRATE", "automaticRestart": True, "preemptible": False},
            "cpuPlatform": "Intel Broadwell",
            "labels": labels,
            "labelFingerprint": _fingerprint(),
            "startRestricted": False,
            "deletionProtection": False,
            "fingerprint": _fingerprint(),
            "lastStartTimestamp": now,
        }
        self._instances[(zone, name)] = instance
        self._order = None
        return instance

    @staticmethod
    def _render(instance: dict) -> dict:
        """GCE omits empty `labels` and empty `metadata.items` from its answers. A shallow view of the
        stored instance (no deep copy per VM per page): serialize it before the lock is released."""
        out = dict(instance)
        if not out["labels"]:
            del out["labels"]
        if not out["metadata"]["items"]:
            out["metadata"] = {k: v for k, v in out["metadata"].items() if k != "items"}
        return out

    @route("GET", INSTANCE, "instances.get")
    def _get(self, request, project, zone, instance):
        self._check_scope(project, zone)
        with self.world.lock:
            return json_response(fieldmask.select(request, self._render(self._must_get(zone, instance)),
                                                  fieldmask.INSTANCE))

    def _listing_order(self) -> list[tuple[str, str]]:
        """Every VM's (zone, name) in listing order (lock held)."""
        if self._order is None:
            self._order = sorted(self._instances)
            self._zones_in_use = {zone for zone, _ in self._order}
        return self._order

    def _page(self, request, zone: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
        """Filter, order by (zone, name) and cut one page, of one zone or of all (lock held; paging.py)."""
        args = request.args
        terms = parse_filter(args.get("filter", ""))
        if args.get("orderBy", "name") not in ("", "name"):
            raise ApiError(400, f"Invalid value for field 'orderBy': '{args['orderBy']}'. Only 'name' is supported.")
        return google_keyset_page(request, self._listing_order(),
                                  lambda key: all(t.matches(self._instances[key]) for t in terms),
                                  max_results=MAX_RESULTS, scope=zone)

    @route("GET", PROJECT + "/zones/<zone>/instances", "instances.list")
    def _list(self, request, project, zone):
        self._check_scope(project, zone)
        body = {"kind": "compute#instanceList", "id": f"projects/{project}/zones/{zone}/instances",
                "selfLink": f"{self._zone_url(zone)}/instances"}
        with self.world.lock:
            page, token = self._page(request, zone)
            if page:
                body["items"] = [self._render(self._instances[key]) for key in page]
            with_next_page_token(body, token)
            return json_response(fieldmask.select(request, body, fieldmask.INSTANCE_LIST))

    @route("GET", PROJECT + "/aggregated/instances", "instances.aggregatedList")
    def _aggregated_list(self, request, project):
        self._check_scope(project)
        region = self.world.region
        fault = injected_fault(request)
        marked_fault = fault is not None and fault.mark
        with self.world.lock:
            page, token = self._page(request)
            zones = {f"{region}-{s}" for s in ZONE_SUFFIXES} | {self.world.zone} | self._zones_in_use
            hidden = self._hidden_zone(request, page)
            items = {f"zones/{zone}": {"instances": []} for zone in sorted(zones)}
            for zone, name in page:
                if zone != hidden:
                    items[f"zones/{zone}"]["instances"].append(self._render(self._instances[(zone, name)]))
            unreachable = []
            marked = f"zones/{hidden}" if hidden and marked_fault else None
            for scope, scoped in items.items():
                if scope == marked:
                    unreachable.append(scope)
                    items[scope] = {"warning": {
                        "code": "UNREACHABLE",
                        "message": f"Scope '{scope}' is unreachable (sandbox fault).",
                        "data": [{"key": "scope", "value": scope}],
                    }}
                elif not scoped["instances"]:
                    items[scope] = {"warning": {
                        "code": "NO_RESULTS_ON_PAGE",
                        "message": f"There are no results for scope '{scope}' on this page.",
                        "data": [{"key": "scope", "value": scope}],
                    }}
            body = {"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances",
                    "items": items, "selfLink": f"{API}/projects/{project}/aggregated/instances"}
            if unreachable:
                body["unreachables"] = unreachable
            with_next_page_token(body, token)
            # Serialized under the lock: the page holds shallow views of the stored VMs.
            return json_response(fieldmask.select(request, body, fieldmask.INSTANCE_AGGREGATED_LIST))

    @staticmethod
    def _hidden_zone(request, page: list[tuple[str, str]]) -> str | None:
        """A `partial` fault leaves one zone out of a listing: the rule's zone, or the first with VMs."""
        fault = injected_fault(request)
        if fault is None or fault.kind != "partial":
            return None
        return fault.zone or (min(zone for zone, _ in page) if page else None)

    @route("POST", PROJECT + "/zones/<zone>/instances", "instances.insert")
    def _insert(self, request, project, zone):
        self._check_scope(project, zone)
        body = read_json(request)
        with self.world.lock:
            instance = self._create(zone, body)
            boot = self.lifecycle.created(zone, instance["name"])
            operation, entries = self._record(request, zone, "insert", instance, takes=boot)
        return self._answer(operation, entries)

    @route("DELETE", INSTANCE, "instances.delete")
    def _delete(self, request, project, zone, instance):
        self._check_scope(project, zone)
        with self.world.lock:
            found = self._must_get(zone, instance)
            del self._instances[(zone, instance)]
            self._order = None
            self._ips_in_use.discard(found["networkInterfaces"][0]["networkIP"])
            self.lifecycle.deleted(zone, instance)
            self.guest_attributes.forget(found["id"])
            operation, entries = self._record(request, zone, "delete", found,
                                              takes=self.world.timing.operation_seconds)
        self._halted(zone, instance)
        return self._answer(operation, entries)

    @route("POST", INSTANCE + "/setLabels", "instances.setLabels")
    def _set_labels(self, request, project, zone, instance):
        self._check_scope(project, zone)
        body = read_json(request)
        with self.world.lock:
            found = self._must_get(zone, instance)
            if not _same_fingerprint(body.get("labelFingerprint"), found["labelFingerprint"]):
                raise ApiError(412, "Labels fingerprint either invalid or resource labels have changed")
            labels = dict(body.get("labels") or {})
            _check_labels(labels)
            found["labels"] = labels
            found["labelFingerprint"] = _fingerprint()
            operation, entries = self._record(request, zone, "setLabels", found,
                                              takes=self.world.timing.operation_seconds)
        return self._answer(operation, entries)

    @route("POST", INSTANCE + "/setMetadata", "instances.setMetadata")
    def _set_metadata(self, request, project, zone, instance):
        self._check_scope(project, zone)
        body = read_json(request)
        with self.world.lock:
            found = self._must_get(zone, instance)
            if not _same_fingerprint(body.get("fingerprint"), found["metadata"]["fingerprint"]):
                raise ApiError(412, "Supplied fingerprint does not match current metadata fingerprint.")
            items = _metadata_items(body)
            found["metadata"] = {"kind": "compute#metadata", "fingerprint": _fingerprint(), "items": items}
            operation, entries = self._record(request, zone, "setMetadata", found,
                                              takes=self.world.timing.operation_seconds)
        return self._answer(operation, entries)

    # ---- operations and audit ------------------------------------------------------------------------

    def _record(self, request, zone: str, verb: str, instance: dict, takes: float = 0.0) -> tuple[dict, list[dict]]:
        """Store the RUNNING operation of a mutation just applied (DONE `takes` seconds later), and build
        its audit entries (lock held)."""
        started = _now()
        op_name = "-".join(["operation", str(int(started.timestamp() * 1000)),
                            secrets.token_hex(7), secrets.token_hex(4), secrets.token_hex(4)])
        operation = {
            "kind": "compute#operation",
            "id": str(10**18 + secrets.randbelow(8 * 10**18)),
            "name": op_name,
            "zone": self._zone_url(zone),
            "operationType": verb,
            "targetLink": instance["selfLink"],
            "targetId": instance["id"],
            "status": "RUNNING",
            "user": self._principal(request),
            "progress": 0,
            "insertTime": _gce_time(started),
            "startTime": _gce_time(started),
            "selfLink": f"{self._zone_url(zone)}/operations/{op_name}",
        }
        self._operations[(zone, op_name)] = operation
        self.op_clock.started(zone, op_name, takes)
        entries = []
        if verb in _AUDITED and request.headers.get("X-Sandbox-No-Event") != "1":
            entries = self._audit_entries(request, zone, verb, instance, operation)
        return copy.deepcopy(operation), entries

    def _answer(self, operation: dict, entries: list[dict]):
        """Publish the audit entries outside the world lock (the sink calls out to Pub/Sub, and a
        subscriber may call back into this emulator): the `first` one before the caller sees the
        operation, the `last` one when the operation finishes, as Cloud Logging writes them (by a timer,
        or by whoever first observes the operation DONE, whichever comes first)."""
        key = (operation["zone"].rsplit("/", 1)[-1], operation["name"])
        for entry in entries[:1]:
            self.world.publish_audit(entry)
        if entries[1:]:
            with self.world.lock:
                self._pending_last[key] = entries[1:]
            remaining = self.op_clock.remaining(*key)
            if remaining <= 0:
                self._flush_last(key)
            else:
                timer = threading.Timer(remaining, self._flush_last, (key,))
                timer.daemon = True
                timer.start()
        return json_response(operation)

    def _flush_last(self, key: tuple[str, str]) -> None:
        with self.world.lock:
            entries = self._pending_last.pop(key, [])
        for entry in entries:
            now = _now()
            entry["timestamp"] = _log_time(now)
            entry["receiveTimestamp"] = _log_time(now + timedelta(milliseconds=40))
            self.world.publish_audit(entry)

    def _audit_entries(self, request, zone: str, verb: str, instance: dict, operation: dict) -> list[dict]:
        """The two Admin Activity entries (`first`, then `last`) Cloud Logging writes for one operation."""
        project = self.project
        version = request.headers.get("X-Sandbox-Method-Prefix", "v1")
        principal = operation["user"]
        entries = []
        for phase in ("first", "last"):
            now = _now()
            payload = {
                "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
                "authenticationInfo": {"principalEmail": principal},
                "requestMetadata": {"callerIp": request.remote_addr or "127.0.0.1",
                                    "callerSuppliedUserAgent": request.headers.get("User-Agent", "")},
                "serviceName": "compute.googleapis.com",
                "methodName": f"{version}.compute.instances.{verb}",
                "resourceName": f"projects/{project}/zones/{zone}/instances/{instance['name']}",
            }
            if phase == "first":
                payload["request"] = {"@type": f"type.googleapis.com/compute.instances.{verb}"}
                payload["response"] = {"@type": "type.googleapis.com/operation", **{
                    k: operation[k] for k in ("id", "name", "operationType", "progress", "selfLink", "status",
                                              "targetId", "targetLink", "user", "zone", "insertTime", "startTime")}}
            entries.append({
                "protoPayload": payload,
                "insertId": secrets.token_hex(6),
                "resource": {"type": "gce_instance",
                             "labels": {"instance_id": instance["id"], "project_id": project, "zone": zone}},
                "timestamp": _log_time(now),
                "receiveTimestamp": _log_time(now + timedelta(milliseconds=40)),
                "severity": "NOTICE",
                "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2Factivity",
                "operation": {"id": operation["name"], "producer": "compute.googleapis.com", phase: True},
            })
        return entries

    @route("GET", ZONE_OPERATION, "zoneOperations.get")
    @route("POST", ZONE_OPERATION + "/wait", "zoneOperations.wait")
    def _operation(self, request, project, zone, operation):
        """An operation stays RUNNING until its time is up (lifecycle.py); `wait` holds until then, or
        until the (scaled) two-minute limit, and answers the operation as it is."""
        self._check_scope(project, zone)
        return self._answer_operation(request, zone, operation, f"projects/{project}/zones/{zone}/operations/{operation}")

    @route("GET", PROJECT + "/global/operations/<operation>", "globalOperations.get")
    @route("POST", PROJECT + "/global/operations/<operation>/wait", "globalOperations.wait")
    def _global_operation(self, request, project, operation):
        self._check_scope(project)
        return self._answer_operation(request, "global", operation, f"projects/{project}/global/operations/{operation}")

    def _answer_operation(self, request, scope: str, operation: str, path: str):
        with self.world.lock:
            if (scope, operation) not in self._operations:
                raise _not_found(path)
        if request.path.endswith("/wait"):
            self.op_clock.hold(scope, operation)
        if self.op_clock.is_done(scope, operation):
            with self.world.lock:
                target = str(self._operations[(scope, operation)].get("targetLink", ""))
            if "/instances/" in target and scope != "global":
                self.lifecycle.catch_up(scope, target.rsplit("/", 1)[-1])
        with self.world.lock:
            found = self._operations[(scope, operation)]
            if found["status"] != "DONE" and self.op_clock.is_done(scope, operation):
                found.update(status="DONE", progress=100, endTime=_gce_time(_now()))
            answer = copy.deepcopy(found)
        if answer["status"] == "DONE":
            self._flush_last((scope, operation))  # its `last` audit entry is out before anyone sees DONE
        return json_response(answer)

    # ---- lifecycle: stop, start, reset ---------------------------------------------------------------

    def _power(self, request, project, zone, instance, verb: str):
        self._check_scope(project, zone)
        with self.world.lock:
            found = self._must_get(zone, instance)
            takes = getattr(self.lifecycle, verb)(zone, instance)
            operation, entries = self._record(request, zone, verb, found, takes=takes)
        if verb in ("stop", "reset"):
            self._halted(zone, instance)
        return self._answer(operation, entries)

    @route("POST", INSTANCE + "/stop", "instances.stop")
    def _stop(self, request, project, zone, instance):
        return self._power(request, project, zone, instance, "stop")

    @route("POST", INSTANCE + "/start", "instances.start")
    def _start(self, request, project, zone, instance):
        return self._power(request, project, zone, instance, "start")

    @route("POST", INSTANCE + "/reset", "instances.reset")
    def _reset(self, request, project, zone, instance):
        return self._power(request, project, zone, instance, "reset")

    # ---- the VM's service account -------------------------------------------------------------------

    def _requested_account(self, body: dict) -> str | None:
        """The account a setServiceAccount body asks for: "default" (or an email left out while scopes
        are given) is the project's default compute account; no email and no scopes removes the account."""
        email = body.get("email") or ""
        if email == "default" or (not email and body.get("scopes")):
            return self.default_compute_sa
        return email or None

    @route("POST", INSTANCE + "/setServiceAccount", "instances.setServiceAccount")
    def _set_service_account(self, request, project, zone, instance):
        """instances.setServiceAccount: only on a stopped VM (GCE answers 400 otherwise, with the message
        below, as gcloud shows it: "The instance must be stopped before the service account can be
        changed."). IAM (compute.instances.setServiceAccount, and actAs on the new account) is checked in
        `_before`. The change takes effect at the next start: the VM's metadata server then mints tokens
        for the new account. Audited like every VM mutation (Admin Activity entry
        v1.compute.instances.setServiceAccount); the Log Router sink forwards only what its filter in
        deploy/terraform names (server.sink_accepts), which today leaves this one out: meshjoin sees the
        change at the `start` that follows (tests/sandbox/test_lifecycle.py checks both)."""
        self._check_scope(project, zone)
        body = read_json(request)
        scopes = body.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ApiError(400, "Invalid value for field 'resource.scopes'.")
        email = self._requested_account(body)
        with self.world.lock:
            found = self._must_get(zone, instance)
            if found["status"] != "TERMINATED":
                raise ApiError(400, "The instance must be stopped before the service account can be changed.")
            if email:
                found["serviceAccounts"] = [{"email": email, "scopes": list(scopes)}]
            else:
                found.pop("serviceAccounts", None)
            operation, entries = self._record(request, zone, "setServiceAccount", found,
                                              takes=self.world.timing.operation_seconds)
        return self._answer(operation, entries)

    # ---- project (common instance) metadata ----------------------------------------------------------

    def _project_json(self) -> dict:
        project = self.project
        metadata = copy.deepcopy(self._project_metadata)
        if not metadata["items"]:
            del metadata["items"]
        return {
            "kind": "compute#project", "id": self.project_number, "name": project,
            "creationTimestamp": "2024-01-01T00:00:00.000-07:00", "commonInstanceMetadata": metadata,
            "defaultServiceAccount": self.default_compute_sa, "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS",
            "defaultNetworkTier": "PREMIUM", "selfLink": f"{API}/projects/{project}",
        }

    @route("GET", PROJECT, "projects.get")
    def _get_project(self, request, project):
        self._check_scope(project)
        with self.world.lock:
            return json_response(fieldmask.select(request, self._project_json(), fieldmask.PROJECT))

    @route("POST", PROJECT + "/setCommonInstanceMetadata", "projects.setCommonInstanceMetadata")
    def _set_common_metadata(self, request, project):
        """projects.setCommonInstanceMetadata: the fingerprint rule of instance metadata, a global operation."""
        self._check_scope(project)
        body = read_json(request)
        with self.world.lock:
            if not _same_fingerprint(body.get("fingerprint"), self._project_metadata["fingerprint"]):
                raise ApiError(412, "Supplied fingerprint does not match current metadata fingerprint.")
            items = _metadata_items(body)
            self._project_metadata = {"kind": "compute#metadata", "fingerprint": _fingerprint(), "items": items}
            started = _now()
            op_name = "-".join(["operation", str(int(started.timestamp() * 1000)), secrets.token_hex(7),
                                secrets.token_hex(4), secrets.token_hex(4)])
            operation = {
                "kind": "compute#operation", "id": str(10**18 + secrets.randbelow(8 * 10**18)), "name": op_name,
                "operationType": "compute.projects.setCommonInstanceMetadata",
                "targetLink": f"{API}/projects/{project}", "targetId": self.project_number,
                "status": "RUNNING", "user": self._principal(request), "progress": 0,
                "insertTime": _gce_time(started), "startTime": _gce_time(started),
                "selfLink": f"{API}/projects/{project}/global/operations/{op_name}",
            }
            self._operations[("global", op_name)] = operation
            self.op_clock.started("global", op_name, self.world.timing.operation_seconds)
            return json_response(copy.deepcopy(operation))

    # ---- guest attributes (written only by the VM, through its own metadata server) ------------------

    def guest_attributes_enabled(self, zone: str, name: str) -> bool:
        """`enable-guest-attributes=TRUE` in instance metadata, else in project metadata (as GCE)."""
        value = self.metadata_value(zone, name, "enable-guest-attributes")
        return (value or "").strip().lower() == "true"

    @route("GET", INSTANCE + "/getGuestAttributes", "instances.getGuestAttributes")
    def _get_guest_attributes(self, request, project, zone, instance):
        self._check_scope(project, zone)
        with self.world.lock:
            found = self._must_get(zone, instance)
        path = f"projects/{project}/zones/{zone}/instances/{instance}"
        body = {"kind": "compute#guestAttributes",
                "selfLink": f"{self._zone_url(zone)}/instances/{instance}/getGuestAttributes"}
        variable_key = request.args.get("variableKey")
        if variable_key:
            value = self.guest_attributes.get(found["id"], variable_key)
            if value is None:
                raise _not_found(f"{path}/guestAttributes/{variable_key}")
            body.update(variableKey=variable_key, variableValue=value)
            return json_response(body)
        query_path = request.args.get("queryPath", "")
        items = self.guest_attributes.query(found["id"], query_path)
        if not items:
            raise _not_found(f"{path}/guestAttributes/{query_path}")
        body.update(queryPath=query_path, queryValue={"items": items})
        return json_response(body)


class ComputeProjects:
    """Compute's one endpoint for every sandbox project: `/compute/v1/projects/P/...` goes to P's
    emulator; a project the sandbox does not hold goes to the host's, which answers as Google does for
    someone else's project (IAM's 403 first)."""

    _PROJECT = re.compile(r"/compute/v1/projects/([^/]+)")

    def __init__(self, emulators: dict[str, ComputeEmulator], host: str):
        self.emulators = emulators
        self.host = host

    @property
    def app(self):
        return self

    def __call__(self, environ, start_response):
        match = self._PROJECT.match(environ.get("PATH_INFO", ""))
        emulator = self.emulators.get(match.group(1) if match else self.host) or self.emulators[self.host]
        return emulator.app(environ, start_response)
