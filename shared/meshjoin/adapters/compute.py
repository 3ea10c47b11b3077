"""Compute Engine: read VMs, write their metadata with the fingerprint. Returns `Vm`, never SDK types.

Calls pass `retry=None`: `retry.call` is the one retry policy, so a failing API costs a bounded
number of attempts instead of the library's minute-long default on top of ours. They also pass
`timeout` (MESHJOIN_API_TIMEOUT): the library's default for Compute is 600 s per call, so a hung
call would otherwise hold the function far past Pub/Sub's ack deadline.

`google.cloud.compute_v1` costs over a second to import (it loads every type), so it is imported
when the first client is built, not with this module.
"""

from __future__ import annotations

from functools import cached_property
from typing import Iterator, Mapping

from ..errors import TransientError
from ..model import Vm, VmKey
from ..settings import Settings
from .retry import call


# Metadata values at least this long are kept once per listing however many VMs carry them.
SHARED_VALUE_BYTES = 1024


class StaleFingerprint(Exception):
    """setMetadata lost a race (412): re-read the VM and decide again."""


class ComputeAdapter:
    def __init__(self, settings: Settings, credentials):
        self._settings = settings
        self._credentials = credentials
        self._json_session = None  # for listings (see list_vms)
        self._timeout = settings.api_timeout.total_seconds()

    # The clients are built on first use: a sweep with nothing to do only lists, and compute_v1 alone
    # costs ~100 MB of RSS and over a second to import.
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

    def _call(self, fn, what: str, permission: str, passthrough=()):
        return call(fn, what=what, permission=permission, attempts=self._settings.api_attempts,
                    passthrough=passthrough)

    def get_vm(self, key: VmKey) -> Vm | None:
        from google.api_core.exceptions import NotFound

        try:
            instance = self._call(
                lambda: self._instances.get(project=key.project, zone=key.zone, instance=key.instance, retry=None,
                                            timeout=self._timeout),
                f"instances.get {key}", "compute.instances.get", passthrough=(NotFound,))
        except NotFound:
            return None
        return to_vm(key, instance)

    def list_vms(self, label_filter: str, page_size: int = 500) -> Iterator[Vm]:
        """Every VM of the project matching `label_filter` (server-side), across zones, paged.

        Pages are read as plain JSON, not through compute_v1's types: its JSON-to-protobuf conversion
        scans every string with a regex, three quarters of a 10,000-VM sweep's time (each VM carries
        ~23 kB of metadata). Metadata values repeated across VMs (the startup script) are kept once.
        """
        from google.api_core.exceptions import from_http_response

        url = f"{self._base_url()}/compute/v1/projects/{self._settings.project}/aggregated/instances"
        params = {"filter": label_filter, "maxResults": page_size}
        shared: dict[str, str] = {}

        def page() -> dict:
            response = self._session().get(url, params=params, timeout=self._timeout)
            if response.status_code >= 400:
                raise from_http_response(response)
            return response.json()

        while True:
            body = self._call(page, "instances.aggregatedList", "compute.instances.list")
            for scope, scoped in (body.get("items") or {}).items():
                zone = scope.rsplit("/", 1)[-1]
                for instance in scoped.get("instances") or []:
                    yield vm_from_json(VmKey(self._settings.project, zone, instance["name"]), instance, shared)
            if not body.get("nextPageToken"):
                return
            params["pageToken"] = body["nextPageToken"]

    def _base_url(self) -> str:
        endpoint = self._settings.compute_endpoint or "compute.googleapis.com"
        return (endpoint if "://" in endpoint else f"https://{endpoint}").rstrip("/")

    def _session(self):
        if self._json_session is None:
            from google.auth.transport.requests import AuthorizedSession

            self._json_session = AuthorizedSession(self._credentials)
        return self._json_session

    def find(self, name: str) -> list[Vm]:
        """VMs of the project with this name, in any zone."""
        return list(self.list_vms(f'name = "{name}"'))

    def set_metadata(self, vm: Vm, items: Mapping[str, str], remove: frozenset[str] = frozenset()) -> None:
        """Write `items` and drop `remove` keys, keeping the owner's other items; 412 → StaleFingerprint."""
        from google.api_core.exceptions import PreconditionFailed

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
                passthrough=(PreconditionFailed,))
        except PreconditionFailed as exc:
            raise StaleFingerprint(str(key)) from exc
        self._wait(key, operation.name)

    def _wait(self, key: VmKey, operation: str) -> None:
        for _ in range(30):  # `wait` returns after ~2 minutes at most; a stuck operation is transient
            result = self._call(
                lambda: self._operations.wait(project=key.project, zone=key.zone, operation=operation, retry=None,
                                              timeout=self._timeout),
                f"zoneOperations.wait {operation}", "compute.zoneOperations.get")
            if result.status == self._compute_v1.Operation.Status.DONE:
                if result.error and result.error.errors:
                    raise TransientError(f"operation {operation} on {key} failed: {result.error.errors[0].message}")
                return
        raise TransientError(f"operation {operation} on {key} did not finish")


def to_vm(key: VmKey, instance) -> Vm:
    interfaces = list(instance.network_interfaces)
    accounts = list(instance.service_accounts)
    return Vm(
        key=key,
        instance_id=str(instance.id),
        labels=dict(instance.labels),
        metadata={item.key: item.value for item in instance.metadata.items},
        metadata_fingerprint=instance.metadata.fingerprint,
        network_ip=interfaces[0].network_i_p if interfaces else "",
        service_account=accounts[0].email if accounts else None,
        status=instance.status,
    )


def vm_from_json(key: VmKey, instance: dict, shared: dict[str, str] | None = None) -> Vm:
    """`to_vm` for an Instance as the REST API's JSON; large values equal to one in `shared` reuse it."""
    shared = {} if shared is None else shared

    def value(item: dict) -> str:
        text = item.get("value", "")
        return shared.setdefault(text, text) if len(text) >= SHARED_VALUE_BYTES else text

    metadata = instance.get("metadata") or {}
    interfaces = instance.get("networkInterfaces") or []
    accounts = instance.get("serviceAccounts") or []
    return Vm(
        key=key,
        instance_id=str(instance.get("id", "")),
        labels=dict(instance.get("labels") or {}),
        metadata={item["key"]: value(item) for item in metadata.get("items") or []},
        metadata_fingerprint=metadata.get("fingerprint", ""),
        network_ip=interfaces[0].get("networkIP", "") if interfaces else "",
        service_account=accounts[0].get("email", "") if accounts else None,
        status=instance.get("status", ""),
    )
