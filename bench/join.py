"""Warm join latency: reconcile-one-VM for a new labelled VM, beside the floor measured in the same run.

Join: the product in this process (`Runtime` on the sandbox's settings, clients built and the CA cached
by a few warm-up joins), `Reconciler.reconcile(key)` of a VM created without an audit event.

Floor: the same round trips, by kind and count as the join just measured made them, sent to the same
emulators as plain keep-alive HTTP requests (same methods, same paths, bodies of the same size), plus
key generation and signing with the product's `pki`: what any implementation of the design pays.
Samples alternate join / floor so machine noise hits both alike.
"""

from __future__ import annotations

import base64
import copy
import json
import statistics
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from meshjoin import names, pki
from meshjoin.model import VmKey

from .world import World, metadata_items

ORDER = [  # dependency order for the replay (fingerprint → setMetadata → wait)
    "compute instances.get", "secretmanager secrets.create", "secretmanager secrets.getIamPolicy",
    "secretmanager secrets.setIamPolicy", "secretmanager secrets.versions.add",
    "kubernetes get serviceaccounts", "kubernetes create serviceaccounts", "kubernetes get services",
    "kubernetes create services", "kubernetes get workloadentries", "kubernetes create workloadentries",
    "kubernetes replace workloadentries", "compute instances.setMetadata", "compute zoneOperations.wait",
]
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples: list[float]) -> dict:
    return {"n": len(samples), "p50_ms": round(statistics.median(samples) * 1000, 2),
            "p99_ms": round(percentile(samples, 99) * 1000, 2), "mean_ms": round(statistics.mean(samples) * 1000, 2),
            "min_ms": round(min(samples) * 1000, 2), "max_ms": round(max(samples) * 1000, 2)}


class Floor:
    """Replays a join's round trips as bare HTTP on keep-alive sessions, plus keygen + signing."""

    def __init__(self, world: World, template_vm: str, settings):
        self.w = world
        self.settings = settings
        cfg = world.cfg
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {cfg.sa_token}"
        self.kube_base = f"https://127.0.0.1:{cfg.ports['kube']}"
        self.sm_base = f"{cfg.url('secretmanager')}/v1/projects/{world.project}/secrets"
        ca_dir = Path(cfg.ca_dir)
        self.ca = pki.load_ca_bundle(*[(ca_dir / f).read_bytes() for f in
                                       ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")])
        # Bodies as large as the real join's: its metadata items and WorkloadEntry, read back.
        joined = world.get_vm(template_vm)
        self.items = metadata_items(joined)
        status = json.loads(self.items["meshjoin-status"])
        namespace, name = status["workloadEntry"].split("/")
        entry = world.kube("GET", f"/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}").json()
        for field in SERVER_FIELDS:
            entry["metadata"].pop(field, None)
        entry.pop("status", None)
        self.entry = entry
        self.namespace = namespace
        self.count = 0

    def run(self, vm: str, calls: Counter) -> None:
        """One floor sample for VM `vm`: the calls of `calls`, in dependency order, then keygen + sign."""
        self.count += 1
        state: dict = {"vm": vm, "secret": f"floor-{self.count}-{vm}"}
        kinds = [k for k in ORDER if k in calls] + sorted(k for k in calls if k not in ORDER)
        for kind in kinds:
            for _ in range(calls[kind]):
                self.call(kind, state)
        if "secretmanager secrets.versions.add" not in calls:
            pki.issue_workload_cert(self.ca, "spiffe://cluster.local/ns/default/sa/default",
                                    now=datetime.now(timezone.utc), ttl=timedelta(hours=24))

    def call(self, kind: str, state: dict) -> None:
        w, http = self.w, self.http
        instance = f"{w.compute_url()}/instances/{state['vm']}"
        secret = f"{self.sm_base}/{state['secret']}"
        entries = f"{self.kube_base}/apis/networking.istio.io/v1/namespaces/{self.namespace}/workloadentries"
        verify = w.cfg.kube_ca_file
        if kind == "compute instances.get":
            state["fingerprint"] = http.get(instance).json()["metadata"]["fingerprint"]
        elif kind == "compute instances.setMetadata":
            body = {"fingerprint": state.get("fingerprint"),
                    "items": [{"key": k, "value": v} for k, v in self.items.items()]}
            state["operation"] = http.post(instance + "/setMetadata", json=body).json()["name"]
        elif kind == "compute zoneOperations.wait":
            http.post(f"{w.compute_url()}/operations/{state['operation']}/wait")
        elif kind == "secretmanager secrets.create":
            http.post(self.sm_base, params={"secretId": state["secret"]},
                      json={"replication": {"automatic": {}}, "labels": {"managed-by": "floor"}})
        elif kind == "secretmanager secrets.getIamPolicy":
            http.post(secret + ":getIamPolicy", json={})
        elif kind == "secretmanager secrets.setIamPolicy":
            http.post(secret + ":setIamPolicy", json={"policy": {"bindings": [
                {"role": "roles/secretmanager.secretAccessor", "members": [f"serviceAccount:{state['vm']}@x.com"]}]}})
        elif kind == "secretmanager secrets.versions.add":
            # The key generation and signing the design needs, then its upload.
            cert = pki.issue_workload_cert(self.ca, "spiffe://cluster.local/ns/default/sa/default",
                                           now=datetime.now(timezone.utc), ttl=timedelta(hours=24))
            payload = json.dumps({"key.pem": cert.key_pem, "cert-chain.pem": cert.chain_pem,
                                  "root-cert.pem": cert.root_pem}).encode()
            http.post(secret + ":addVersion", json={"payload": {"data": base64.b64encode(payload).decode()}})
        elif kind.startswith("kubernetes "):
            _, verb, plural = kind.split(" ")
            if plural == "workloadentries":
                name = names.entry_name(VmKey(w.project, w.zone, state['vm']))
                if verb == "get":
                    http.get(f"{entries}/{name}", verify=verify)
                elif verb == "create":
                    body = copy.deepcopy(self.entry)
                    body["metadata"]["name"] = name
                    http.post(entries, json=body, verify=verify)
                else:
                    http.get(f"{entries}/{name}", verify=verify)
            else:
                base = f"{self.kube_base}/api/v1/namespaces/{self.namespace}/{plural}"
                http.get(f"{base}/default" if plural == "serviceaccounts" else f"{base}/kubernetes", verify=verify)
        elif kind.startswith("compute "):
            http.get(instance)
        elif kind.startswith("secretmanager "):
            http.get(f"{self.sm_base}/{self.settings.ca_cert_secret}")
        else:
            raise ValueError(f"no floor request for {kind}")


def run(quick: bool = False) -> dict:
    samples = 20 if quick else 80
    warmup = 3
    with World(label="join") as world:
        rt = world.runtime()
        names = [f"join-{i:03d}" for i in range(samples + warmup)]
        floors = [f"floor-{i:03d}" for i in range(samples)]
        world.create_vms(names, {"mesh": "join"}, event=False)
        world.create_vms(floors, {"bench": "floor"}, event=False)
        rec = rt.reconciler
        for name in names[:warmup]:
            outcome = rec.reconcile(VmKey(world.project, world.zone, name))
            assert outcome.verb == "registered", outcome
        floor = Floor(world, names[0], rt.settings)
        join_s, floor_s, per_join = [], [], []
        verbs = Counter()
        for i, name in enumerate(names[warmup:]):
            key = VmKey(world.project, world.zone, name)
            order = ("join", "floor") if i % 2 == 0 else ("floor", "join")
            for what in order:
                if what == "join":
                    world.reset_stats()
                    t0 = time.perf_counter()
                    outcome = rec.reconcile(key)
                    join_s.append(time.perf_counter() - t0)
                    verbs[outcome.verb] += 1
                    calls = world.stats()
                    per_join.append(calls)
                else:
                    replay = per_join[-1]  # i == 0 measures the join first
                    t0 = time.perf_counter()
                    floor.run(floors[i], replay)
                    floor_s.append(time.perf_counter() - t0)
        by_kind = Counter()
        for calls in per_join:
            by_kind.update(calls)
        typical = Counter({k: round(v / len(per_join), 2) for k, v in by_kind.items()})
        join_summary, floor_summary = summary_ms(join_s), summary_ms(floor_s)
        return {
            "samples": samples,
            "verbs": dict(verbs),
            "join": join_summary,
            "floor": floor_summary,
            "ratio_p50": round(join_summary["p50_ms"] / floor_summary["p50_ms"], 2),
            "ratio_p99": round(join_summary["p99_ms"] / floor_summary["p99_ms"], 2),
            "ratio_p99_to_floor_p50": round(join_summary["p99_ms"] / floor_summary["p50_ms"], 2),
            "calls_per_join": dict(sorted(typical.items())),
            "calls_per_join_total": round(sum(typical.values()), 2),
            "sandbox_up_s": round(world.up_seconds, 1),
        }
