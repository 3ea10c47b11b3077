"""The Kubernetes objects that register a VM in the mesh, as plain dicts. Pure.

WorkloadEntry (networking.istio.io/v1) for the VM, the Service that selects the app's entries
(Istio's registry matches Service selectors against WorkloadEntry labels) and the
ServiceAccount named by the identity. Everything carries meshjoin's ownership marks.
"""

from __future__ import annotations

from datetime import datetime

from . import names
from .model import Identity, Vm, VmKey

ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSION = "v1"


def _owned_labels(**extra: str) -> dict[str, str]:
    return {names.MANAGED_BY_LABEL: names.MANAGED_BY, **extra}


def entry_ref(key: VmKey, identity: Identity) -> str:
    """`namespace/name` of the VM's WorkloadEntry: what its status's `workloadEntry` names."""
    return f"{identity.namespace}/{names.entry_name(key)}"


def workload_entry(vm: Vm, identity: Identity, network: str, cert_not_after: datetime) -> dict:
    key = vm.key
    workload_labels = {
        "app": identity.app,
        "version": identity.version,
        "service.istio.io/canonical-name": identity.app,
        "service.istio.io/canonical-revision": identity.version,
    }
    spec: dict = {
        "address": vm.network_ip,
        "labels": workload_labels,
        "serviceAccount": identity.service_account,
        "locality": f"{key.region}/{key.zone}",
    }
    if network:
        spec["network"] = network
    if identity.ports:
        spec["ports"] = dict(identity.ports)
    return {
        "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": names.entry_name(key),
            "namespace": identity.namespace,
            "labels": _owned_labels(**workload_labels, **{names.VM_LABEL: key.instance}),
            "annotations": {
                names.ANNOTATION_PREFIX + "project": key.project,
                names.ANNOTATION_PREFIX + "zone": key.zone,
                names.ANNOTATION_PREFIX + "instance": key.instance,
                names.ANNOTATION_PREFIX + "instance-id": vm.instance_id,
                names.ANNOTATION_PREFIX + "cert-not-after": cert_not_after.isoformat().replace("+00:00", "Z"),
            },
        },
        "spec": spec,
    }


def service(identity: Identity) -> dict | None:
    """The app's Service; none for a VM that serves no ports (a mesh client only)."""
    if not identity.ports:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": identity.app,
            "namespace": identity.namespace,
            "labels": _owned_labels(app=identity.app),
        },
        "spec": {
            "selector": {"app": identity.app},
            "ports": [{"name": name, "port": port, "targetPort": port, "protocol": "TCP"}
                      for name, port in sorted(identity.ports.items())],
        },
    }


def service_account(identity: Identity) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": identity.service_account,
            "namespace": identity.namespace,
            "labels": _owned_labels(),
        },
    }


def entry_matches(existing: dict, desired: dict) -> bool:
    """True when writing `desired` would change nothing meshjoin cares about."""
    meta_e, meta_d = existing.get("metadata", {}), desired["metadata"]
    return (
        existing.get("spec") == desired["spec"]
        and all(meta_e.get("labels", {}).get(k) == v for k, v in meta_d["labels"].items())
        and all(meta_e.get("annotations", {}).get(k) == v for k, v in meta_d["annotations"].items())
    )


def service_matches(existing: dict, desired: dict) -> bool:
    """True when the existing Service already has the ports and selector meshjoin wants."""
    def ports(obj: dict) -> list:
        return sorted((p.get("name"), p.get("port"), p.get("targetPort"), p.get("protocol", "TCP"))
                      for p in (obj.get("spec") or {}).get("ports") or [])
    return (existing.get("spec") or {}).get("selector") == desired["spec"]["selector"] and \
        ports(existing) == ports(desired)
