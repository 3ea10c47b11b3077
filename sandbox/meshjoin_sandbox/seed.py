"""`POST /seed`: a fleet of VMs that meshjoin already registered, written straight into the emulators.

Benchmarks need thousands of joined VMs (instance + metadata + the agent's guest attributes +
WorkloadEntry) in seconds; joining them one by one through the functions would take longer than the
measurement. The caller (bench/) renders what one real join left once, with placeholders, and this
expands it per VM:

    {"zone": "us-central1-a", "prefix": "fleet-", "start": 0, "count": 1000,
     "labels": {...}, "service_account": "@@NAME@@@...",
     "metadata": {"meshjoin-status": "{... @@ID@@ @@IP@@ @@NOT_AFTER@@ ...}", "meshjoin-cert-chain": ..., ...},
     "vary": [{"@@NOT_AFTER@@": "..."}, ...],       # cycled over the VMs by index
     "guest_attributes": {"meshjoin": {"csr": "...", "cert-serial": "...", "sidecar": "running"}},
     "secret": {"id": "...@@NAME@@", "labels": {...}, "data": "...", "reader": "serviceAccount:..."},
     "workload_entry": {... a WorkloadEntry with placeholders ...}}

`guest_attributes` are what the VM's agent wrote (namespace -> key -> value), stored as if the VM had
written them, without its write rate limit. `secret` (optional) is a meshjoin 2 per-VM secret, for
fleets that still carry legacy secrets; `secret_every` (default 1) seeds it for every k-th VM only
(index % k == 0).

Placeholders: @@NAME@@, @@ZONE@@, @@INDEX@@, @@INDEX9@@ (the index as nine digits: a fixed-width value
that makes an item unique per VM, e.g. inside a PEM body), @@ID@@ and @@IP@@ (what Compute assigned), plus
the keys of the `vary` entry. Nothing here goes through the APIs, so seeding is not counted in /stats and
publishes no audit entries. The WorkloadEntry template is admitted (schema + CEL) once per call.
"""

from __future__ import annotations

import base64
import json
import os
import time

from .web import ApiError

ISTIO = ("networking.istio.io", "workloadentries")


def _fill(text: str, values: dict[str, str]) -> str:
    if "@@" not in text:
        return text  # shared, not copied: thousands of identical startup scripts cost one string
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def seed_fleet(world, body: dict) -> dict:
    started = time.monotonic()
    compute = world.emulators["compute"]
    secrets = world.emulators["secretmanager"]
    kube = world.emulators.get("kube")
    zone = body.get("zone") or world.zone
    prefix, start, count = body.get("prefix", "fleet-"), int(body.get("start", 0)), int(body.get("count", 0))
    labels = body.get("labels") or {}
    metadata = body.get("metadata") or {}
    vary = body.get("vary") or [{}]
    secret = body.get("secret")
    secret_every = int(body.get("secret_every", 1))
    if secret_every < 1:
        raise ApiError(400, "secret_every must be at least 1")
    guest_attributes = body.get("guest_attributes") or {}
    if not all(isinstance(keys, dict) for keys in guest_attributes.values()):
        raise ApiError(400, "guest_attributes: namespace -> {key: value}")
    entry_template = json.dumps(body["workload_entry"]) if body.get("workload_entry") else None
    if entry_template and kube is None:
        raise ApiError(400, "no Kubernetes emulator in this world")
    kind = kube._kinds[ISTIO] if entry_template else None
    admitted = False
    for index in range(start, start + count):
        name = f"{prefix}{index:05d}"
        account = body.get("service_account")
        created = compute.seed_instance(zone, name, labels=labels, metadata=metadata,
                                        service_account=_fill(account, {"@@NAME@@": name}) if account else None)
        values = {"@@NAME@@": name, "@@ZONE@@": zone, "@@INDEX@@": str(index),
                  "@@INDEX9@@": f"{index:09d}", "@@ID@@": created["id"],
                  "@@IP@@": created["networkInterfaces"][0]["networkIP"], **vary[index % len(vary)]}
        with world.lock:  # the status names the instance id Compute just assigned
            for item in compute._instances[(zone, name)]["metadata"]["items"]:
                item["value"] = _fill(item["value"], values)
        if guest_attributes:
            attributes = compute.guest_attributes
            with attributes._lock:  # the VM's own writes, seeded: no rate limit applies to seeding
                per_vm = attributes._values.setdefault(created["id"], {})
                for namespace, keys in guest_attributes.items():
                    per_vm.setdefault(namespace, {}).update({k: _fill(str(v), values) for k, v in keys.items()})
        if secret and index % secret_every == 0:
            secret_id = _fill(secret["id"], values)
            secrets.put(secret_id, _fill(secret.get("data", "{}"), values).encode(),
                        labels={k: _fill(v, values) for k, v in (secret.get("labels") or {}).items()})
            if secret.get("reader"):
                with world.lock:
                    secrets._secrets[secret_id].policy = {
                        "version": 1, "etag": base64.b64encode(os.urandom(8)).decode(),
                        "bindings": [{"role": "roles/secretmanager.secretAccessor",
                                      "members": [_fill(secret["reader"], values)]}]}
        if entry_template:
            entry = json.loads(_fill(entry_template, values))
            with kube._lock:
                if not admitted:
                    if ("", entry["metadata"]["namespace"]) not in kube._objects["namespaces"]:
                        raise ApiError(404, f"namespace {entry['metadata']['namespace']} not found")
                    kube._admit(kind, entry["apiVersion"].rsplit("/", 1)[-1], entry, None, "Strict")
                    admitted = True
                if (entry["metadata"]["namespace"], entry["metadata"]["name"]) in kube._objects[kind.resource]:
                    raise ApiError(409, f"WorkloadEntry {entry['metadata']['name']} already exists")
                kube._insert(kind, entry)
    return {"seeded": count, "seconds": round(time.monotonic() - started, 3)}
