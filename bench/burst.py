"""Burst: N labelled VMs created at once, each joined through the real functions, each VM's side played
by a `ProtocolAgent` (bench/agent.py) on the same wire as the real agent. Time until every VM is joined.

Each insert's audit entries go through the sink → the real Pub/Sub emulator → push → functions-framework →
the event function. A join is three passes (issue 14): meshjoin bootstraps the VM (no certificate); the VM's
agent, once the bootstrap is there, writes its CSR to its guest attributes and nudges (a message on the
events topic, through the same Pub/Sub emulator); meshjoin certifies the VM's key into `meshjoin-cert-chain`;
the agent reads it, reports `cert-serial` + `sidecar=running` and nudges; meshjoin confirms and registers
the WorkloadEntry. The bench learns that a pass is done from the function's log line for it (the line
follows the metadata write), which is when it lets the VM's agent act: a real agent learns it from its
metadata server (`wait_for_change`), which the bench agent still reads to check that the chain certifies
its own key. CSR → certificate = from the CSR's write (before its nudge) to the log line of the pass that
delivered the certificate (written after the metadata write and its operation are done).

The function is warmed by one join first (its cold start is measured on its own). Joined = the function
logged `registered` for the VM; then the emulators are checked: `meshjoin-status` joined, one WorkloadEntry
per VM, and one certificate per VM, for the VM's own key (`keyId` = the agent's key, `keyCerts` 1, one
`certified` log line): duplicates = VMs with more than one certificate or entry. Each run is bounded by a
deadline; what did not finish by then is reported, not hidden.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from meshjoin_sandbox import launcher

from meshjoin import pki

from .agent import ProtocolAgent
from .join import percentile
from .world import BENCH_ACCOUNT, World, entry_instance, status_of, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _log_time(value: str) -> float:
    """meshjoin's log `time` (logging's local-time formatTime + ms) → epoch seconds."""
    stamp, _, millis = value.rstrip("Z").partition(".")
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


class LogTail:
    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""

    def lines(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        *complete, self.partial = text.split("\n")
        return launcher.json_lines("\n".join(complete))


def group_cpu(pgids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each sandbox process group (all live processes of the group)."""
    out = dict.fromkeys(pgids, 0.0)
    by_pgid = {pgid: name for name, pgid in pgids.items()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = by_pgid.get(int(fields[2]))
        if name:
            out[name] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class Agents:
    """Every VM's agent, acting when the function's log says meshjoin's pass for its VM is done."""

    def __init__(self, world: World, workers: int = 64):
        self.world = world
        self.pool = ThreadPoolExecutor(workers)
        self.agents: dict[str, ProtocolAgent] = {}
        self.csr_at: dict[str, float] = {}
        self.cert_at: dict[str, float] = {}
        self.reported: set[str] = set()
        self.joined_at: dict[str, float] = {}
        self.registered: Counter = Counter()
        self.certified: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def _act(self, name: str, what: str) -> None:
        try:
            if what == "csr":
                agent = ProtocolAgent(self.world, name)  # its key is made here, on "the VM"
                with self.lock:
                    self.agents[name] = agent
                agent.send_csr()
                self.csr_at[name] = time.time()
                agent.nudge()
            else:
                agent = self.agents[name]
                agent.wait_certificate(60)  # the chain in its metadata certifies its own key
                agent.report()
                agent.nudge()
        except Exception as exc:  # counted: the VM will show up as lost
            self.errors.append(f"{name} {what}: {type(exc).__name__}: {str(exc)[:200]}")

    def feed(self, entries: list[dict], wanted) -> None:
        for entry in entries:
            name = entry.get("instance")
            if name not in wanted:
                continue
            outcome = entry.get("outcome")
            if outcome == "certified":
                self.certified[name] += 1
            if "message_id" not in entry:
                continue
            self.outcomes[outcome] += 1
            if outcome == "bootstrapped" and name not in self.csr_at and name not in self.agents:
                self.agents[name] = None  # scheduled once
                self.pool.submit(self._act, name, "csr")
            elif outcome == "delivered" and name not in self.reported:
                self.reported.add(name)
                self.cert_at[name] = _log_time(entry["time"])
                self.pool.submit(self._act, name, "report")
            elif outcome == "registered":
                self.registered[name] += 1
                self.joined_at.setdefault(name, _log_time(entry["time"]))

    def csr_to_cert_s(self) -> list[float]:
        return [self.cert_at[n] - self.csr_at[n] for n in self.cert_at if n in self.csr_at]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run_one(n: int, deadline_s: float, threads: int | None = None, create_workers: int = 16) -> dict:
    function_env = {"THREADS": str(threads)} if threads else {}
    with World.open(label=f"burst{n}", function_env=function_env) as world:
        log = LogTail(world.state_dir / "logs" / "events_fn.log")
        # Warm the function (its first event builds clients and reads the CA) with one whole join.
        warm = Agents(world, workers=4)
        world.create_vm("warm-0", {"mesh": "join"})
        wait_for(lambda: (warm.feed(log.lines(), {"warm-0"}), "warm-0" in warm.joined_at)[1], 90,
                 what="the warm-up join")
        warm.close()
        idle_csr_to_cert = warm.csr_to_cert_s()  # one VM alone: no queue in front of its passes
        pids = json.loads((world.state_dir / "pids.json").read_text())
        names = [f"b{n}-{i:04d}" for i in range(n)]
        world.reset_stats()
        cpu0 = group_cpu(pids)
        agents = Agents(world)
        sessions = [requests.Session() for _ in range(create_workers)]
        for s in sessions:
            s.headers.update(world.http.headers)
        t0 = time.time()

        def create(i: int) -> None:
            world.create_vm(names[i], {"mesh": "join", "burst": str(n)}, service_account=BENCH_ACCOUNT,
                            session=sessions[i % create_workers])

        with ThreadPoolExecutor(create_workers) as pool:
            list(pool.map(create, range(n)))
        created_s = time.time() - t0
        wanted = set(names)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            agents.feed(log.lines(), wanted)
            if len(agents.joined_at) == n:
                break
            time.sleep(0.2)
        waited_s = time.time() - t0
        cpu1 = group_cpu(pids)
        calls = world.stats()
        time.sleep(3)  # late redeliveries would show up as duplicates
        agents.feed(log.lines(), wanted)
        agents.close()
        check = _end_state(world, names, n, agents)
        joined_at = agents.joined_at
        all_joined = len(joined_at) == n
        to_cert = agents.csr_to_cert_s()
        return {
            "n": n,
            "function_threads": threads or (os.cpu_count() or 1) * 4,
            "deadline_s": deadline_s,
            "create_s": round(created_s, 2),
            "all_joined": all_joined,
            "time_to_all_joined_s": round(max(joined_at.values()) - t0, 2) if all_joined else None,
            "time_to_half_joined_s": round(sorted(joined_at.values())[n // 2 - 1] - t0, 2) if len(joined_at) >= n // 2
            else None,
            "joined_by_deadline": len(joined_at),
            "waited_s": round(waited_s, 1),
            "joins_per_s": round(len(joined_at) / (max(joined_at.values()) - t0), 1) if joined_at else 0,
            "csr_to_cert_s": {"n": len(to_cert), "p50": round(percentile(to_cert, 50), 2),
                              "p99": round(percentile(to_cert, 99), 2), "max": round(max(to_cert), 2)}
            if to_cert else None,
            "idle_csr_to_cert_s": round(idle_csr_to_cert[0], 2) if idle_csr_to_cert else None,
            "lost": n - check["joined"],
            "duplicates": check["duplicates"],
            "end_state": check,
            "function_outcomes": dict(agents.outcomes),
            "agent_errors": agents.errors[:5],
            "calls_per_vm": {k: round(v / n, 2) for k, v in sorted(calls.items())},
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in sorted(cpu0)},
            "sandbox_up_s": round(world.up_seconds, 1),
        }


def _end_state(world: World, names: list[str], n: int, agents: Agents | None) -> dict:
    vms = {vm["name"]: vm for vm in world.list_vms(f"labels.burst={n}")}
    statuses = {name: status_of(vms[name]) if name in vms else {} for name in names}
    joined = sum(1 for s in statuses.values() if s.get("state") == "joined")
    entries = world.kube("GET", "/apis/networking.istio.io/v1/workloadentries",
                         ).json().get("items", [])
    per_vm = Counter(entry_instance(e) for e in entries)
    extra_entries = [name for name in names if per_vm.get(name, 0) > 1]
    missing_entries = [name for name in names if per_vm.get(name, 0) == 0]
    # One certificate per VM, for the key its agent made: keyCerts 1 and keyId = the agent's key.
    extra_certs = [name for name, s in statuses.items() if s.get("keyCerts") not in (None, "1")]
    if agents is not None:
        extra_certs += [name for name in names if agents.certified.get(name, 0) > 1 or agents.registered[name] > 1]
    foreign_key = []
    for name, s in statuses.items():
        agent = agents.agents.get(name) if agents else None
        if agent is not None and s.get("keyId") and s["keyId"] != pki.key_id(agent.key.public_key()):
            foreign_key.append(name)
    return {"joined": joined, "states": dict(Counter(s.get("state", "none") for s in statuses.values())),
            "vms_with_more_than_one_cert": len(set(extra_certs)), "vms_certified_for_another_key": len(foreign_key),
            "vms_with_extra_entries": len(extra_entries), "vms_without_entry": len(missing_entries),
            "duplicates": len(set(extra_certs) | set(extra_entries) | set(foreign_key))}


def run_direct(n: int, concurrency: int = 8) -> dict:
    """The function's own capacity: each pass of N VMs' joins posted straight to it, `concurrency` at a time
    (real Pub/Sub push keeps many requests outstanding; the emulator's push loop sends one at a time). Each
    push is an operator message naming a labelled VM created without an audit event, as the agent's nudge
    is. Phases: N bootstrap pushes; every agent writes its CSR; N certificate pushes; every agent reads its
    certificate and reports; N confirmation pushes. Joins per second = N / the three push phases' time."""
    with World.open(label=f"direct{n}") as world:
        url = world.cfg.url("events_fn") + "/"
        names = [f"d{n}-{i:04d}" for i in range(n)]
        world.create_vms(["warm-0"] + names, {"mesh": "join", "burst": str(n)}, event=False)
        sessions = [requests.Session() for _ in range(concurrency)]
        statuses: Counter = Counter()
        counter = iter(range(10**9))

        def push(i: int, name: str) -> None:
            message = {"data": base64.b64encode(json.dumps({"project": world.project, "zone": world.zone,
                                                              "instance": name}).encode()).decode(),
                       "messageId": f"direct-{next(counter)}",
                       "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for attempt in range(3):  # gunicorn drops idle keep-alive connections; Pub/Sub would redeliver too
                try:
                    response = sessions[i % concurrency].post(
                        url, json={"message": message, "subscription": "direct"}, timeout=180)
                    statuses[response.status_code] += 1
                    return
                except requests.ConnectionError:
                    statuses["connection error, retried"] += 1
            raise RuntimeError(f"push for {name} failed 3 times")

        def pushes(targets: list[str]) -> float:
            t0 = time.time()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda i: push(i, targets[i]), range(len(targets))))
            return time.time() - t0

        def agents_do(fn, targets: list[str]) -> float:
            t0 = time.time()
            with ThreadPoolExecutor(64) as pool:
                list(pool.map(fn, targets))
            return time.time() - t0

        agents: dict[str, ProtocolAgent] = {}

        def csr(name: str) -> None:
            agents[name] = ProtocolAgent(world, name)
            agents[name].send_csr()

        def report(name: str) -> None:
            agents[name].wait_certificate(60)
            agents[name].report()

        pushes(["warm-0"]), csr("warm-0"), pushes(["warm-0"]), report("warm-0"), pushes(["warm-0"])
        world.reset_stats()
        pids = json.loads((world.state_dir / "pids.json").read_text())
        load0 = os.getloadavg()[0]
        # The event function's process group CPU during each push phase only (the agents' phases between them
        # run in this process): what the function spends per pass, functions-framework included.
        fn_cpu: dict[str, float] = {}

        def pushes_cpu(phase: str, targets: list[str]) -> float:
            before = group_cpu(pids)["events_fn"]
            elapsed = pushes(targets)
            fn_cpu[phase] = group_cpu(pids)["events_fn"] - before
            return elapsed

        phases = {"bootstrap_pushes_s": pushes_cpu("bootstrap", names), "agents_csr_s": agents_do(csr, names),
                  "certificate_pushes_s": pushes_cpu("certificate", names),
                  "agents_report_s": agents_do(report, names),
                  "confirmation_pushes_s": pushes_cpu("confirmation", names)}
        calls = world.stats()
        pushing = phases["bootstrap_pushes_s"] + phases["certificate_pushes_s"] + phases["confirmation_pushes_s"]
        check = _end_state(world, names, n, None)
        return {"n": n, "concurrency": concurrency, "phases_s": {k: round(v, 2) for k, v in phases.items()},
                "push_phases_s": round(pushing, 2), "joins_per_s": round(n / pushing, 1),
                "passes_per_s": round(3 * n / pushing, 1),
                "function_cpu_ms_per_pass": {k: round(v * 1000 / n, 2) for k, v in fn_cpu.items()},
                "function_cpu_ms_per_join": round(sum(fn_cpu.values()) * 1000 / n, 2),
                "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "http_statuses": {str(k): v for k, v in statuses.items()},
                "calls_per_vm": {k: round(v / n, 2) for k, v in sorted(calls.items())},
                "lost": n - check["joined"], "duplicates": check["duplicates"], "end_state": check}


def run(quick: bool = False) -> dict:
    # (N, deadline, repeats). A join is three passes now, each waiting for its metadata operation.
    # About 3.5 passes a second get through the Pub/Sub emulator's push loop here: 1,000 VMs would take ~15 min.
    # BENCH_BURST_N=1000,10000 / BENCH_BURST_DIRECT=1000: other sizes (deadline: 2 s per VM, at least 5 min).
    env_sizes = [int(x) for x in os.environ.get("BENCH_BURST_N", "").split(",") if x.strip()]
    sizes = [(n, max(300.0, 2.0 * n), 1) for n in env_sizes] if env_sizes else \
        [(50, 240.0, 1)] if quick else [(1000, 2400.0, 1)]
    runs = []
    for n, deadline, repeats in sizes:
        for repeat in range(repeats):
            load0 = os.getloadavg()[0]
            runs.append({**run_one(n, deadline), "repeat": repeat + 1,
                         "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]})
            print(f"  burst n={n} #{repeat + 1}: {runs[-1]['time_to_all_joined_s']} s", file=sys.stderr, flush=True)
    direct_n = int(os.environ.get("BENCH_BURST_DIRECT", "0") or 0) or (50 if quick else 1000)
    direct = run_direct(direct_n)
    return {"runs": runs, "direct": direct}
