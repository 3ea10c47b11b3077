"""Warm join, renewal and key rotation of one VM: meshjoin's passes, their API calls by kind, beside a floor.

A join is now three reconcile passes (issue 14, keys stay on the VM):
1. bootstrap: the VM is labelled; meshjoin writes the bootstrap items, no certificate (`bootstrapped`);
2. certificate: the VM's agent handed in a CSR (guest attribute `meshjoin/csr`); meshjoin validates it and
   writes `meshjoin-cert-chain` for the VM's own key (`delivered`);
3. confirmation: the agent installed it and reported `cert-serial` + `sidecar=running`; meshjoin creates the
   WorkloadEntry (`registered`).
The product runs in this process (`Runtime` on the sandbox's settings, clients built and the CA cached by a
few warm-up joins); `Reconciler.reconcile(key)` is called as an event (a nudge) calls it. Between the passes a
`ProtocolAgent` (bench/agent.py) plays the VM: key made here, CSR and report written to the VM's own
metadata server. The nudges themselves are not sent: calling reconcile is what a nudge does. A join's time
is the sum of its three passes (meshjoin's work; the agent's time between them is not counted).

Floor: per sample, the same round trips by kind and count as the three passes just measured made them,
sent to the same emulators as bare keep-alive HTTP requests (same methods, same paths, bodies of the
joined VM's size), plus one `parse_csr` + `certify`: what any implementation of the design pays.
Samples alternate join / floor so machine noise hits both alike.

Renewal: a joined VM's reconcile by a reconciler whose clock is 20 h ahead (24 h certificates renew at
50 % ± 10 %), as the sweep calls it (`read_agent=False`): `renewed`, the same key re-certified; then the
agent reports the new serial and the nudge's pass (`refreshed`/`unchanged`). Rotation: the same with
MESHJOIN_KEY_ROTATION_RENEWALS=1, so that renewal also asks for a new key (`meshjoin-rekey`); the agent
makes one, hands in its CSR (pass `rotated`), installs and reports it (confirmation pass).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests
from cryptography.hazmat.primitives.asymmetric import ec

from meshjoin import names, pki
from meshjoin.model import VmKey

from .agent import SPKI, ProtocolAgent
from .keys import vm_csr, vm_key
from .world import World, metadata_items, status_of, wait_for

PASSES = ("bootstrap", "certificate", "confirmation")
ORDER = [  # dependency order for the replay (fingerprint → setMetadata → wait)
    "compute instances.get", "compute projects.get", "compute instances.getGuestAttributes",
    "kubernetes get serviceaccounts", "kubernetes create serviceaccounts", "kubernetes get services",
    "kubernetes create services", "kubernetes get workloadentries", "kubernetes create workloadentries",
    "kubernetes replace workloadentries", "compute instances.setMetadata", "compute zoneOperations.wait",
]
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
# Secret Manager methods that change nothing; any other is a write.
SECRET_READS = ("secrets.get", "secrets.list", "secrets.getIamPolicy", "secrets.versions.access",
                "secrets.versions.get", "secrets.versions.list")
RENEWAL_CLOCK_AHEAD = timedelta(hours=20)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples: list[float]) -> dict:
    return {"n": len(samples), "p50_ms": round(statistics.median(samples) * 1000, 2),
            "p99_ms": round(percentile(samples, 99) * 1000, 2), "mean_ms": round(statistics.mean(samples) * 1000, 2),
            "min_ms": round(min(samples) * 1000, 2), "max_ms": round(max(samples) * 1000, 2)}


def secret_writes(calls: Counter) -> int:
    return sum(v for k, v in calls.items() if k.startswith("secretmanager ") and k.split(" ", 1)[1] not in SECRET_READS)


def mean_calls(per_sample: list[Counter]) -> dict:
    total = Counter()
    for calls in per_sample:
        total.update(calls)
    return {k: round(v / len(per_sample), 2) for k, v in sorted(total.items())} if per_sample else {}


class Floor:
    """Replays a join's round trips as bare HTTP on keep-alive sessions, plus one CSR check + signature."""

    def __init__(self, world: World, template_vm: str):
        self.w = world
        cfg = world.cfg
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {cfg.sa_token}"
        self.kube_base = f"https://127.0.0.1:{cfg.ports['kube']}"
        ca_dir = Path(cfg.ca_dir)
        self.ca = pki.load_ca_bundle(*[(ca_dir / f).read_bytes() for f in
                                       ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")])
        # Bodies as large as the real join's: its metadata items (with the chain) and WorkloadEntry, read back.
        joined = world.get_vm(template_vm)
        self.items = metadata_items(joined)
        status = status_of(joined)
        namespace, name = status["workloadEntry"].split("/")
        entry = world.kube("GET", f"/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}").json()
        for field in SERVER_FIELDS:
            entry["metadata"].pop(field, None)
        entry.pop("status", None)
        self.entry = entry
        self.namespace = namespace

    def run(self, vm: str, passes: list[Counter], csr: str) -> None:
        """One floor sample for VM `vm`: each pass's calls in dependency order; the CSR checked and signed once."""
        for index, calls in enumerate(passes):
            state: dict = {"vm": vm}
            kinds = [k for k in ORDER if k in calls] + sorted(k for k in calls if k not in ORDER)
            for kind in kinds:
                if kind == "compute instances.setMetadata" and index == 1:
                    verified = pki.parse_csr(csr, "ecdsa-p256")  # signed before the write that delivers it
                    pki.certify(self.ca, verified.public_key, "spiffe://cluster.local/ns/default/sa/default",
                                now=datetime.now(timezone.utc), ttl=timedelta(hours=24))
                for _ in range(calls[kind]):
                    self.call(kind, state)

    def call(self, kind: str, state: dict) -> None:
        w, http = self.w, self.http
        instance = f"{w.compute_url()}/instances/{state['vm']}"
        entries = f"{self.kube_base}/apis/networking.istio.io/v1/namespaces/{self.namespace}/workloadentries"
        verify = w.cfg.kube_ca_file
        if kind == "compute instances.get":
            state["fingerprint"] = http.get(instance).json()["metadata"]["fingerprint"]
        elif kind == "compute instances.getGuestAttributes":
            http.get(instance + "/getGuestAttributes", params={"queryPath": "meshjoin/"})
        elif kind == "compute projects.get":
            http.get(f"{w.cfg.url('compute')}/compute/v1/projects/{w.project}")
        elif kind == "compute instances.setMetadata":
            body = {"fingerprint": state.get("fingerprint"),
                    "items": [{"key": k, "value": v} for k, v in self.items.items()]}
            state["operation"] = http.post(instance + "/setMetadata", json=body).json()["name"]
            state["fingerprint"] = None
        elif kind == "compute zoneOperations.wait":
            http.post(f"{w.compute_url()}/operations/{state['operation']}/wait")
        elif kind.startswith("kubernetes "):
            _, verb, plural = kind.split(" ")
            if plural == "workloadentries":
                name = names.entry_name(VmKey(w.project, w.zone, state['vm']))
                if verb == "create":
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
            # Only cache refreshes of the plug-in CA fall into a pass (a join writes nothing there): read it.
            secret = f"{w.cfg.url('secretmanager')}/v1/projects/{w.project}/secrets/{w.cfg.ca_secrets[0]}"
            http.get(secret + ("/versions" if kind.endswith("versions.list") else
                               "/versions/latest:access" if kind.endswith("versions.access") else ""))
        elif kind == "container get":
            http.get(f"{w.cfg.url('container')}/v1/{w.cfg.cluster_path}")
        else:
            raise ValueError(f"no floor request for {kind}")


class Timed:
    """reconcile passes with their time, their CPU time and the emulators' request counts.

    CPU: `time.process_time()` of this process around the pass. The product runs here and nothing else
    does meanwhile (the agent acts between passes, the emulators are other processes), so it is the CPU
    an event function's process spends on the pass itself (without functions-framework's share, which
    bench/burst.py's direct run measures in the real function process).
    """

    def __init__(self, world: World):
        self.world = world
        self.last_cpu = 0.0

    def __call__(self, reconciler, key: VmKey, expect: tuple[str, ...], **kwargs):
        self.world.reset_stats()
        c0 = time.process_time()
        t0 = time.perf_counter()
        outcome = reconciler.reconcile(key, **kwargs)
        elapsed = time.perf_counter() - t0
        self.last_cpu = time.process_time() - c0
        calls = self.world.stats()
        if outcome.verb not in expect:
            raise RuntimeError(f"{key.instance}: reconcile said {outcome.verb!r} ({outcome.reason[:300]}), "
                               f"expected {expect}")
        return outcome, elapsed, calls


def join_one(world: World, rec, key: VmKey, timed: Timed,
             cpu: list[float] | None = None) -> tuple[ProtocolAgent, list[float], list[Counter]]:
    """The three passes of one VM's first join, the VM's side played between them (`cpu`: each pass's CPU s)."""
    agent = ProtocolAgent(world, key.instance)
    times, calls, cpu = [], [], [] if cpu is None else cpu
    _, t, c = timed(rec, key, ("bootstrapped",))
    times.append(t), calls.append(c), cpu.append(timed.last_cpu)
    agent.send_csr()
    _, t, c = timed(rec, key, ("delivered",))
    times.append(t), calls.append(c), cpu.append(timed.last_cpu)
    agent.wait_certificate(30)
    agent.report()
    _, t, c = timed(rec, key, ("registered",))
    times.append(t), calls.append(c), cpu.append(timed.last_cpu)
    return agent, times, calls


def _ahead(rec, delta: timedelta):
    """A reconciler on the same clients whose clock is `delta` ahead (past the renewal point)."""
    ahead = copy.copy(rec)
    ahead.clock = lambda: datetime.now(timezone.utc) + delta
    return ahead


def _wait_new_leaf(agent: ProtocolAgent, old_serial: str, timeout: float = 30) -> None:
    def new_serial() -> str | None:
        leaf = agent.certificate()
        serial = format(leaf.serial_number, "x") if leaf is not None else None
        return serial if serial != old_serial else None

    agent.serial = wait_for(new_serial, timeout, interval=0.05, what=f"{agent.name}: a new certificate for its key")


def renewals(world: World, rec, timed: Timed, joined: list[tuple[VmKey, ProtocolAgent]],
             warm: tuple[VmKey, ProtocolAgent]) -> dict:
    ahead = _ahead(rec, RENEWAL_CLOCK_AHEAD)
    # The jump of the clock expires the CA and project-metadata caches once: a warm-up VM pays for it.
    timed(ahead, warm[0], ("renewed",), read_agent=False)
    renew_calls, confirm_calls, renew_s, verbs = [], [], [], Counter()
    renew_cpu, report_cpu = [], []
    for key, agent in joined:
        old = agent.serial
        outcome, t, calls = timed(ahead, key, ("renewed",), read_agent=False)
        renew_calls.append(calls), renew_s.append(t), renew_cpu.append(timed.last_cpu)
        status = status_of(world.get_vm(key.instance))
        if status.get("keyCerts") != "2" or status.get("state") != "joined":
            raise RuntimeError(f"{key.instance}: after a renewal the status says {status}")
        _wait_new_leaf(agent, old)
        agent.report()
        outcome, t, calls = timed(ahead, key, ("refreshed", "unchanged"))
        verbs[outcome.verb] += 1
        confirm_calls.append(calls), report_cpu.append(timed.last_cpu)
    return {"vms": len(joined), "renewal_pass_cpu_ms": summary_ms(renew_cpu), "report_pass_cpu_ms": summary_ms(report_cpu), "how": f"reconciler clock {RENEWAL_CLOCK_AHEAD} ahead, read_agent=False (as the sweep)",
            "renewal_pass": mean_calls(renew_calls), "renewal_pass_total": round(sum(sum(c.values()) for c in renew_calls) / len(renew_calls), 2),
            "renewal_pass_ms": summary_ms(renew_s),
            "report_pass": mean_calls(confirm_calls), "report_pass_verbs": dict(verbs),
            "report_pass_total": round(sum(sum(c.values()) for c in confirm_calls) / len(confirm_calls), 2),
            "secret_manager_writes": sum(secret_writes(c) for c in renew_calls + confirm_calls)}


def rotations(world: World, timed: Timed, joined: list[tuple[VmKey, ProtocolAgent]],
              warm: tuple[VmKey, ProtocolAgent]) -> dict:
    rec = _ahead(world.runtime(MESHJOIN_KEY_ROTATION_RENEWALS="1").reconciler, RENEWAL_CLOCK_AHEAD)
    timed(rec, warm[0], ("renewed",), read_agent=False)  # a new runtime: clients, cluster, CA and caches
    asking, csr_pass, confirm_pass, verbs = [], [], [], Counter()
    for key, agent in joined:
        old_key_id = status_of(world.get_vm(key.instance))["keyId"]
        _, _, calls = timed(rec, key, ("renewed",), read_agent=False)
        asking.append(calls)
        status = status_of(world.get_vm(key.instance))
        if not status.get("rekey") or names.REKEY_KEY not in metadata_items(world.get_vm(key.instance)):
            raise RuntimeError(f"{key.instance}: the renewal asked for no new key: {status}")
        # The agent sees meshjoin-rekey: a new (pending) key, its CSR, a nudge. (It would also install the
        # renewed chain of its current key and report it: skipped here, that pass is the renewal's report pass.)
        agent.key = ec.generate_private_key(ec.SECP256R1())
        agent.public = agent.key.public_key().public_bytes(*SPKI)
        agent.send_csr()
        outcome, _, calls = timed(rec, key, ("rotated",))
        csr_pass.append(calls)
        agent.wait_certificate(30)
        agent.report()
        outcome, _, calls = timed(rec, key, ("refreshed", "unchanged"))
        verbs[outcome.verb] += 1
        confirm_pass.append(calls)
        status = status_of(world.get_vm(key.instance))
        if status.get("keyId") == old_key_id or status.get("keyCerts") != "1" or status.get("state") != "joined":
            raise RuntimeError(f"{key.instance}: after a rotation the status says {status}")
    total = [sum(sum(c.values()) for c in pass_) / len(pass_) for pass_ in (csr_pass, confirm_pass)]
    return {"vms": len(joined),
            "how": "MESHJOIN_KEY_ROTATION_RENEWALS=1 so the renewal (clock 20 h ahead) asks for a new key; "
                   "the agent's CSR pass, then its report's pass",
            "asking_renewal_pass": mean_calls(asking), "csr_pass": mean_calls(csr_pass),
            "confirmation_pass": mean_calls(confirm_pass), "confirmation_verbs": dict(verbs),
            "per_rotation_total": round(sum(total), 2),
            "secret_manager_writes": sum(secret_writes(c) for c in asking + csr_pass + confirm_pass)}


def run(quick: bool = False) -> dict:
    samples = 10 if quick else 40
    follow_ups = 4 if quick else 10
    warmup = 3
    with World.open(label="join") as world:
        rt = world.runtime()
        rec = rt.reconciler
        timed = Timed(world)
        vm_names = [f"join-{i:03d}" for i in range(samples + warmup)]
        rot_names = [f"rot-{i:03d}" for i in range(follow_ups)]
        floors = [f"floor-{i:03d}" for i in range(samples)]
        world.create_vms(vm_names + rot_names, {"mesh": "join"}, event=False)
        world.create_vms(floors, {"bench": "floor"}, event=False)
        warm = []
        for name in vm_names[:warmup]:
            key = VmKey(world.project, world.zone, name)
            warm.append((key, join_one(world, rec, key, timed)[0]))
        floor = Floor(world, vm_names[0])
        floor_csrs = [vm_csr(vm_key("ecdsa-p256")) for _ in range(samples)]
        join_s, floor_s, pass_s, per_join = [], [], {p: [] for p in PASSES}, []
        join_cpu, floor_cpu, pass_cpu = [], [], {p: [] for p in PASSES}
        joined = []
        for i, name in enumerate(vm_names[warmup:]):
            key = VmKey(world.project, world.zone, name)
            order = ("join", "floor") if i % 2 == 0 else ("floor", "join")
            for what in order:
                if what == "join":
                    cpu: list[float] = []
                    agent, times, calls = join_one(world, rec, key, timed, cpu)
                    joined.append((key, agent))
                    join_s.append(sum(times))
                    join_cpu.append(sum(cpu))
                    for p, t, c in zip(PASSES, times, cpu):
                        pass_s[p].append(t)
                        pass_cpu[p].append(c)
                    per_join.append(calls)
                else:
                    replay = per_join[-1] if per_join else None
                    if replay is None:  # i == 0 measures the join first
                        continue
                    c0, t0 = time.process_time(), time.perf_counter()
                    floor.run(floors[i], replay, floor_csrs[i])
                    floor_s.append(time.perf_counter() - t0)
                    floor_cpu.append(time.process_time() - c0)
            if len(floor_s) < len(join_s) and i == 0:
                c0, t0 = time.process_time(), time.perf_counter()
                floor.run(floors[i], per_join[-1], floor_csrs[i])
                floor_s.append(time.perf_counter() - t0)
                floor_cpu.append(time.process_time() - c0)
        by_pass = {p: mean_calls([calls[j] for calls in per_join]) for j, p in enumerate(PASSES)}
        whole = [sum(calls, Counter()) for calls in per_join]
        typical = mean_calls(whole)
        renewal = renewals(world, rec, timed, joined[:follow_ups], warm[0])
        rotation_vms = []
        for name in rot_names:
            key = VmKey(world.project, world.zone, name)
            agent, _, _ = join_one(world, rec, key, timed)
            rotation_vms.append((key, agent))
        rotation = rotations(world, timed, rotation_vms, warm[1])
        join_summary, floor_summary = summary_ms(join_s), summary_ms(floor_s)
        secret_manager_calls = sum(v for calls in whole for k, v in calls.items() if k.startswith("secretmanager "))
        return {
            "samples": samples,
            "join": join_summary,
            "floor": floor_summary,
            "passes_ms": {p: summary_ms(v) for p, v in pass_s.items()},
            # CPU of this process (process_time) during the passes / the floor's replay: meshjoin's CPU per join.
            "cpu": {"join_ms": summary_ms(join_cpu), "floor_ms": summary_ms(floor_cpu),
                    "passes_ms": {p: summary_ms(v) for p, v in pass_cpu.items()},
                    "load_avg": [round(x, 2) for x in os.getloadavg()]},
            "ratio_p50": round(join_summary["p50_ms"] / floor_summary["p50_ms"], 2),
            "ratio_p99": round(join_summary["p99_ms"] / floor_summary["p99_ms"], 2),
            "ratio_p99_to_floor_p50": round(join_summary["p99_ms"] / floor_summary["p50_ms"], 2),
            "calls_per_join": typical,
            "calls_per_join_total": round(sum(typical.values()), 2),
            "calls_per_pass": by_pass,
            "secret_manager_writes_per_join": round(sum(secret_writes(c) for c in whole) / len(whole), 2),
            "secret_manager_calls_per_join": round(secret_manager_calls / len(whole), 2),
            "renewal": renewal,
            "rotation": rotation,
            "sandbox_up_s": round(world.up_seconds, 1),
        }
