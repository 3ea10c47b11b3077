"""Compute Engine: read VMs, write their metadata with the fingerprint. Returns `Vm`, never SDK types.

Calls pass `retry=None`: `retry.call` is the one retry policy, so a failing API costs a bounded
number of attempts instead of the library's minute-long default on top of ours. They also pass
`timeout` (MESHJOIN_API_TIMEOUT): the library's default for Compute is 600 s per call, so a hung
call would otherwise hold the function far past Pub/Sub's ack deadline.

`google.cloud.compute_v1` costs over a second to import (it loads every type), so it is imported
when the first client is built, not with this module.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from ..errors import TransientError
from ..model import Vm, VmKey
from ..settings import Settings
from .retry import call


class StaleFingerprint(Exception):
    """setMetadata lost a race (412): re-read the VM and decide again."""


class ComputeAdapter:
    def __init__(self, settings: Settings, credentials):
        from google.cloud import compute_v1

        self._compute_v1 = compute_v1
        self._settings = settings
        self._timeout = settings.api_timeout.total_seconds()
        options = {"api_endpoint": settings.compute_endpoint} if settings.compute_endpoint else None
        kwargs = dict(transport="rest", credentials=credentials, client_options=options)
        self._instances = compute_v1.InstancesClient(**kwargs)
        # Built here with the same endpoint: the client's own operation polling would ignore it.
        self._operations = compute_v1.ZoneOperationsClient(**kwargs)

    def _call(self, fn, what: str, permission: str, passthrough=()):
        return call(fn, what=what, permission=permission, attempts=self._settings.api_attempts,
                    passthrough=passthrough)

    def get_vm(self, key: VmKey) -> Vm | None:
        from google.api_core.exceptions import NotFound

        try:
            instance = self._call(
                lambda: self._instances.get(project=key.project, zone=key.zone, instance=key.instance, retry=None, timeout=self._timeout),
                f"instances.get {key}", "compute.instances.get", passthrough=(NotFound,))
        except NotFound:
            return None
        return to_vm(key, instance)

    def list_vms(self, label_filter: str, page_size: int = 500) -> Iterator[Vm]:
        """Every VM of the project matching `label_filter` (server-side), across zones, paged."""
        request = self._compute_v1.AggregatedListInstancesRequest(
            project=self._settings.project, filter=label_filter, max_results=page_size)
        pager = self._call(lambda: self._instances.aggregated_list(request=request, retry=None, timeout=self._timeout),
                           "instances.aggregatedList", "compute.instances.list")
        # Each further page is fetched lazily by the pager; a failure mid-listing surfaces here.
        iterator = iter(pager)
        while True:
            try:
                zone_path, scoped = self._call(lambda: next(iterator), "instances.aggregatedList page",
                                               "compute.instances.list", passthrough=(StopIteration,))
            except StopIteration:
                return
            zone = zone_path.rsplit("/", 1)[-1]
            for instance in scoped.instances:
                yield to_vm(VmKey(self._settings.project, zone, instance.name), instance)

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
                    project=key.project, zone=key.zone, instance=key.instance, metadata_resource=body, retry=None, timeout=self._timeout),
                f"instances.setMetadata {key}", "compute.instances.setMetadata",
                passthrough=(PreconditionFailed,))
        except PreconditionFailed as exc:
            raise StaleFingerprint(str(key)) from exc
        self._wait(key, operation.name)

    def _wait(self, key: VmKey, operation: str) -> None:
        for _ in range(30):  # `wait` returns after ~2 minutes at most; a stuck operation is transient
            result = self._call(
                lambda: self._operations.wait(project=key.project, zone=key.zone, operation=operation, retry=None, timeout=self._timeout),
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
