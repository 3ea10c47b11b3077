"""Burst: N labelled VMs created at once; each insert's audit entries go through the sink → the real
Pub/Sub emulator → push → functions-framework → the event function. Time until every VM is joined.

The function is warmed by one join first (its cold start is measured on its own). Joined = the
function logged `registered` for the VM (the log line follows the metadata write that reports
`joined`); the end state is then checked in the emulators: every VM's `meshjoin-status` is `joined`,
exactly one WorkloadEntry and one secret version per VM (duplicates = VMs that got more than one
certificate or entry). Each run is bounded; what did not finish by the deadline is reported, not hidden.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

# meshjoin's part of a join is done at `waiting` (the VM's agent then confirms, making it `joined`):
# the bench measures meshjoin, so either counts as delivered.
DELIVERED = ("waiting", "joined")

from meshjoin_sandbox import launcher

from .world import BENCH_ACCOUNT, World, status_of

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


def run_one(n: int, deadline_s: float, threads: int | None = None, create_workers: int = 16) -> dict:
    function_env = {"THREADS": str(threads)} if threads else {}
    with World(label=f"burst{n}", function_env=function_env) as world:
        log = LogTail(world.state_dir / "logs" / "events_fn.log")
        # Warm the function (its first event builds clients and reads the CA).
        world.create_vm("warm-0", {"mesh": "join"})
        _wait(lambda: any(e.get("instance") == "warm-0" and e.get("outcome") == "registered" for e in log.lines()),
              60, "the warm-up join")
        pids = json.loads((world.state_dir / "pids.json").read_text())
        names = [f"b{n}-{i:04d}" for i in range(n)]
        world.reset_stats()
        cpu0 = group_cpu(pids)
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
        registered: Counter = Counter()
        joined_at: dict[str, float] = {}
        outcomes: Counter = Counter()
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for entry in log.lines():
                instance = entry.get("instance")
                if instance not in wanted or "message_id" not in entry:
                    continue
                outcomes[entry.get("outcome")] += 1
                if entry.get("outcome") == "registered":
                    registered[instance] += 1
                    joined_at.setdefault(instance, _log_time(entry["time"]))
            if len(joined_at) == n:
                break
            time.sleep(0.25)
        waited_s = time.time() - t0
        cpu1 = group_cpu(pids)
        calls = world.stats()
        time.sleep(3)  # late redeliveries would show up as duplicates
        for entry in log.lines():
            if entry.get("instance") in wanted and "message_id" in entry:
                outcomes[entry.get("outcome")] += 1
                if entry.get("outcome") == "registered":
                    registered[entry["instance"]] += 1
        check = _end_state(world, names, n)
        all_joined = len(joined_at) == n
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
            "lost": n - check["joined"],
            "duplicates": check["duplicates"] + sum(1 for c in registered.values() if c > 1),
            "end_state": check,
            "function_outcomes": dict(outcomes),
            "calls_per_vm": {k: round(v / n, 2) for k, v in sorted(calls.items())},
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in sorted(cpu0)},
            "sandbox_up_s": round(world.up_seconds, 1),
        }


def _end_state(world: World, names: list[str], n: int) -> dict:
    vms = {vm["name"]: vm for vm in world.list_vms(f"labels.burst={n}")}
    statuses = {name: status_of(vms[name]) if name in vms else {} for name in names}
    joined = sum(1 for s in statuses.values() if s.get("state") in DELIVERED)
    not_first_version = [name for name, s in statuses.items() if s.get("secret") and
                         not s["secret"].endswith("/versions/1")]
    entries = world.kube("GET", "/apis/networking.istio.io/v1/workloadentries",
                         ).json().get("items", [])
    per_vm = Counter((e["metadata"].get("annotations") or {}).get("meshjoin.dev/instance") for e in entries)
    extra_entries = [name for name in names if per_vm.get(name, 0) > 1]
    missing_entries = [name for name in names if per_vm.get(name, 0) == 0]
    return {"joined": joined, "states": dict(Counter(s.get("state", "none") for s in statuses.values())),
            "secret_version_not_1": len(not_first_version), "vms_with_extra_entries": len(extra_entries),
            "vms_without_entry": len(missing_entries),
            "duplicates": len(set(not_first_version) | set(extra_entries))}


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def run_direct(n: int, concurrency: int = 8, deadline_s: float = 180.0) -> dict:
    """The function's own capacity: N pushes posted straight to it, `concurrency` at a time (real Pub/Sub
    push keeps many requests outstanding; the emulator's push loop sends one at a time). Each push is an
    operator message naming a labelled VM created without an audit event: the same reconcile."""
    with World(label=f"direct{n}") as world:
        url = world.cfg.url("events_fn") + "/"
        names = [f"d{n}-{i:04d}" for i in range(n)]
        world.create_vms(["warm-0"] + names, {"mesh": "join", "burst": str(n)}, event=False)
        sessions = [requests.Session() for _ in range(concurrency)]
        statuses: Counter = Counter()

        def push(i: int, name: str) -> None:
            message = {"data": base64.b64encode(json.dumps({"project": world.project, "zone": world.zone,
                                                              "instance": name}).encode()).decode(),
                       "messageId": f"direct-{i}", "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for attempt in range(3):  # gunicorn drops idle keep-alive connections; Pub/Sub would redeliver too
                try:
                    response = sessions[i % concurrency].post(
                        url, json={"message": message, "subscription": "direct"}, timeout=deadline_s)
                    statuses[response.status_code] += 1
                    return
                except requests.ConnectionError:
                    statuses["connection error, retried"] += 1
            raise RuntimeError(f"push for {name} failed 3 times")

        push(0, "warm-0")
        world.reset_stats()
        t0 = time.time()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda i: push(i, names[i]), range(n)))
        elapsed = time.time() - t0
        check = _end_state(world, names, n)
        return {"n": n, "concurrency": concurrency, "time_to_all_handled_s": round(elapsed, 2),
                "joins_per_s": round(n / elapsed, 1), "http_statuses": {str(k): v for k, v in statuses.items()},
                "lost": n - check["joined"], "duplicates": check["duplicates"], "end_state": check}


def run(quick: bool = False) -> dict:
    # (N, deadline, repeats): the 1,000-VM burst runs three times, a fresh sandbox each, to show the noise.
    sizes = [(100, 90.0, 1)] if quick else [(100, 90.0, 1), (1000, 240.0, 3)]
    runs = []
    for n, deadline, repeats in sizes:
        for repeat in range(repeats):
            runs.append({**run_one(n, deadline), "repeat": repeat + 1})
            print(f"  burst n={n} #{repeat + 1}: {runs[-1]['time_to_all_joined_s']} s", file=sys.stderr, flush=True)
    direct = run_direct(100 if quick else 1000)
    return {"runs": runs, "direct": direct}
