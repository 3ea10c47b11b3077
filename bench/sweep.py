"""Sweep: a fleet of N registered VMs, seeded straight into the emulators, swept once by a fresh process.

Scenarios (a fresh sandbox each, so they do not leak into each other):
- `nothing-due`: every certificate is 1 h into its 24 h life;
- `third-due`: one VM in three is 13 h in (past the 50 % renewal point, whatever its jitter);
- `tenth-deleted`: every tenth VM was deleted without an event (its WorkloadEntry is an orphan);
- `legacy-secrets`: every tenth VM migrated from meshjoin 2 and still has its per-VM secret (labelled as
  meshjoin 2 made them; no `meshjoin-secret` item any more): the sweep deletes them (`MESHJOIN_PRUNE_CAP`).

The fleet is what a real join leaves: one VM is joined through the product (three passes, its agent
played by a ProtocolAgent), and its instance metadata (status with `keyId`/`keyCerts`/`confirmedSerial`,
`meshjoin-cert-chain`), its agent's guest attributes (`csr`, `cert-serial`, `sidecar`) and WorkloadEntry
become templates that `POST /seed` expands per VM. No per-VM secrets: keys stay on the VMs. All seeded VMs
share the template's CSR (one key; each status names it, so a renewal re-certifies it as it would each
VM's own key), and the chain in their metadata is the template's (the status, which meshjoin decides from,
carries each scenario's dates).
The sweep runs in a child process (the scheduled function's work, in the function environment) whose
peak RSS is its `ru_maxrss`. API calls are the emulators' request counts during the sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meshjoin import names
from meshjoin.model import VmKey

from .agent import ProtocolAgent
from .keys import vm_csr
from .world import BENCH_ACCOUNT, World, metadata_items

REPO = Path(__file__).resolve().parents[1]
CHILD = str(Path(__file__).with_name("_sweep_child.py"))
SOURCE = str(REPO / "functions" / "maintenance" / "main.py")
TEMPLATE = "tplvm"
SUBNET = "10.128.0.0/16"  # a /20 holds 4092 VMs
SCENARIOS = ("nothing-due", "third-due", "tenth-deleted", "legacy-secrets")
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _templates(world: World) -> dict:
    """Join one VM through the product (its agent played by a ProtocolAgent); turn what it left into
    /seed templates: its metadata, its agent's guest attributes and its WorkloadEntry."""
    rt = world.runtime()
    world.create_vm(TEMPLATE, {"mesh": "join"}, event=False)
    key = VmKey(world.project, world.zone, TEMPLATE)
    agent = ProtocolAgent(world, TEMPLATE)
    for expected, vm_side in (("bootstrapped", agent.send_csr), ("delivered", None), ("registered", None)):
        outcome = rt.reconciler.reconcile(key)
        assert outcome.verb == expected, outcome
        if vm_side:
            vm_side()
        elif expected == "delivered":
            agent.wait_certificate(30)
            agent.report()
    vm = world.get_vm(TEMPLATE)
    items = metadata_items(vm)
    status = json.loads(items["meshjoin-status"])
    assert status.get("state") == "joined" and status.get("keyId") and "secret" not in status, status
    ip, instance_id = vm["networkInterfaces"][0]["networkIP"], vm["id"]

    def placeholders(text: str) -> str:
        return (text.replace(instance_id, "@@ID@@").replace(f'"{ip}"', '"@@IP@@"')
                .replace(status["certNotBefore"], "@@NB@@").replace(status["certNotAfter"], "@@NA@@")
                .replace(TEMPLATE, "@@NAME@@"))

    namespace, name = status["workloadEntry"].split("/")
    entry = world.kube("GET", f"/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}").json()
    for field in SERVER_FIELDS:
        entry["metadata"].pop(field, None)
    entry.pop("status", None)
    return {
        "labels": vm.get("labels", {}),
        "service_account": BENCH_ACCOUNT,
        "metadata": {k: placeholders(v) for k, v in items.items()},
        # Every seeded VM hands in the template VM's CSR (one shared key: its status names that key, so a
        # renewal re-certifies it as it would each VM's own), and reports the template's serial, confirmed.
        "guest_attributes": {"meshjoin": {"csr": vm_csr(agent.key), "cert-serial": agent.serial,
                                          "sidecar": "running", "agent-version": "bench"}},
        "workload_entry": json.loads(placeholders(json.dumps(entry))),
    }


def _legacy_secret(world: World) -> dict:
    """A meshjoin 2 per-VM secret as it made them: its id and labels name the VM (names.secret_id)."""
    settings = world.settings()
    part = names.project_part(world.project)
    return {"id": f"{settings.secret_prefix}-{part}-@@ZONE@@-@@NAME@@",
            "labels": {names.SECRET_OWNER_LABEL: names.MANAGED_BY, "meshjoin-project": part,
                       "meshjoin-zone": "@@ZONE@@", "meshjoin-instance": "@@NAME@@"},
            "data": json.dumps({"key.pem": "(seeded)", "cert-chain.pem": "(seeded)", "root-cert.pem": "(seeded)"}),
            "reader": f"serviceAccount:{BENCH_ACCOUNT}"}


def _vary(scenario: str) -> list[dict]:
    now = datetime.now(timezone.utc)
    fresh_nb = now - timedelta(hours=1)
    due_nb = now - timedelta(hours=13)
    fresh = {"@@NB@@": _stamp(fresh_nb), "@@NA@@": _stamp(fresh_nb + timedelta(hours=24))}
    due = {"@@NB@@": _stamp(due_nb), "@@NA@@": _stamp(due_nb + timedelta(hours=24))}
    return [due, fresh, fresh] if scenario == "third-due" else [fresh]


def run_one(n: int, scenario: str, timeout_s: float) -> dict:
    with World(label=f"sweep{n}", compute_subnet=SUBNET) as world:
        templates = _templates(world)
        t0 = time.monotonic()
        chunk = 1000
        if scenario == "legacy-secrets":
            templates = {**templates, "secret": _legacy_secret(world), "secret_every": 10}
        for start in range(0, n - 1, chunk):
            world.control("POST", "/seed", {"zone": world.zone, "prefix": "fleet-", "start": start,
                                            "count": min(chunk, n - 1 - start), "vary": _vary(scenario),
                                            **templates})
        seed_s = time.monotonic() - t0
        deleted = 0
        if scenario == "tenth-deleted":
            for index in range(0, n - 1, 10):
                world.delete_vm(f"fleet-{index:05d}", event=False)
                deleted += 1
        log_path = world.state_dir / "sweep.log"
        world.reset_stats()
        t0 = time.time()
        try:
            out = subprocess.run([sys.executable, CHILD, str(log_path), SOURCE, world.cfg.url("control")],
                                 env=world.process_env(),
                                 capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO))
        except subprocess.TimeoutExpired:
            return {"n": n, "scenario": scenario, "timed_out_after_s": timeout_s}
        child_s = time.time() - t0
        calls = world.stats()
        if out.returncode != 0:
            raise RuntimeError(f"sweep child failed: {out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # Listing = the calls made while taking the inventory (the three paged listings + Services).
        listing = result["phases"].get("inventory_calls", {})
        lists = sum(listing.values())
        return {
            "n": n, "scenario": scenario, "deleted": deleted, "seed_s": round(seed_s, 1),
            **result,
            "child_process_s": round(child_s, 2),
            "calls": dict(sorted(calls.items())),
            "list_calls": lists,
            "list_calls_per_500_vms": round(lists / (n / 500), 2),
            "other_calls": sum(calls.values()) - lists,
            "sandbox_up_s": round(world.up_seconds, 1),
        }


def run(quick: bool = False) -> dict:
    sizes = (200, 2000) if quick else (1000, 10000)
    runs = []
    for n in sizes:
        for scenario in SCENARIOS:
            runs.append(run_one(n, scenario, timeout_s=300))
            print(f"  sweep n={n} {scenario}: {runs[-1].get('wall_s')} s", file=sys.stderr, flush=True)
    return {"runs": runs}
