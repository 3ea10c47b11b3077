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

**At scale** (`python -m bench.sweep --sizes 10000,30000,100000`, or `BENCH_ONLY=sweep_scale make bench`):
the same seeding, with the metadata a joined VM carries once the agent's text lives in project metadata
(issue 16): the status, the certificate chain (each VM's own: the listing cannot share it), cluster.env,
mesh config, root certificate and the other bootstrap items, and a short `startup-script` stub (`STUB_BYTES`)
instead of today's ~23 kB script. The fleet spreads over four zones. Besides wall time, each run records the
sweeping process's own CPU, the emulators' CPU (the sandbox's world process) over the same tick, peak RSS,
list calls per 500 VMs and the load average. Scenarios: `nothing-due` (one tick) and `third-due` (the tick's
sweep as a dry run: list and plan; with `--publish`, a real tick on the same fleet too, which publishes the
work once the sweep publishes instead of reconciling inline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meshjoin import bootstrap, names
from meshjoin.model import VmKey

from .agent import ProtocolAgent
from .burst import group_cpu
from .keys import vm_csr
from .world import BENCH_ACCOUNT, World, metadata_items, status_of

REPO = Path(__file__).resolve().parents[1]
CHILD = str(Path(__file__).with_name("_sweep_child.py"))
SOURCE = str(REPO / "functions" / "maintenance" / "main.py")
TEMPLATE = "tplvm"
SUBNET = "10.128.0.0/16"  # a /20 holds 4092 VMs
SCENARIOS = ("nothing-due", "third-due", "tenth-deleted", "legacy-secrets")
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
# At scale: a /15 holds 131,068 VMs; the fleet spreads over these zones of the sandbox's region, one /seed
# chunk at a time.
SCALE_SUBNET = "10.128.0.0/15"
SCALE_ZONE_SUFFIXES = ("a", "b", "c", "f")
SCALE_SCENARIOS = ("nothing-due", "third-due")
SCALE_SIZES = (10000, 30000, 100000)
SCALE_QUICK_SIZES = (2000, 6000)
STUB_BYTES = 400
# Until the agent's stub exists (issue 16: `bootstrap.startup_stub()`), the fleet carries a stand-in of the
# size the design names: fetch the versioned agent from project metadata, check its pinned SHA-256, run it.
STAND_IN_STUB = """#!/bin/bash
# meshjoin agent stub: the agent itself is project metadata, fetched and checked here
set -euo pipefail
md=http://metadata.google.internal/computeMetadata/v1/project/attributes
sha=@@SHA256@@
key=meshjoin-agent-${sha:0:16}
agent=$(mktemp)
curl -fsS -H 'Metadata-Flavor: Google' "$md/$key" -o "$agent"
echo "$sha  $agent" | sha256sum -c --status || { logger -t meshjoin "agent $key: SHA-256 mismatch"; exit 1; }
exec bash "$agent"
""".replace("@@SHA256@@", "0" * 64)


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _templates(world: World, issue16_metadata: bool = False) -> dict:
    """Join one VM through the product (its agent played by a ProtocolAgent); turn what it left into
    /seed templates: its metadata, its agent's guest attributes and its WorkloadEntry.

    `issue16_metadata`: the metadata a joined VM carries once the agent lives in project metadata: the
    `startup-script` is the short stub, and each VM's certificate chain is its own (its index replaces nine
    base64 characters of the leaf, so no two VMs share the value; nothing reads a chain back from metadata).
    The zone becomes a placeholder too, so the fleet can spread over zones."""
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
    status = status_of(vm)
    assert status.get("state") == "joined" and status.get("keyId") and "secret" not in status, status
    ip, instance_id = vm["networkInterfaces"][0]["networkIP"], vm["id"]

    def placeholders(text: str) -> str:
        text = (text.replace(instance_id, "@@ID@@").replace(f'"{ip}"', '"@@IP@@"')
                .replace(status["certNotBefore"], "@@NB@@").replace(status["certNotAfter"], "@@NA@@")
                .replace(TEMPLATE, "@@NAME@@"))
        return text.replace(world.zone, "@@ZONE@@") if issue16_metadata else text

    namespace, name = status["workloadEntry"].split("/")
    entry = world.kube("GET", f"/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}").json()
    for field in SERVER_FIELDS:
        entry["metadata"].pop(field, None)
    entry.pop("status", None)
    metadata = {k: placeholders(v) for k, v in items.items()}
    if issue16_metadata:
        metadata[names.STARTUP_SCRIPT_KEY] = startup_stub()
        metadata[names.CERT_CHAIN_KEY] = _own_chain(metadata[names.CERT_CHAIN_KEY])
    return {
        "labels": vm.get("labels", {}),
        "service_account": BENCH_ACCOUNT,
        "metadata": metadata,
        # Every seeded VM hands in the template VM's CSR (one shared key: its status names that key, so a
        # renewal re-certifies it as it would each VM's own), and reports the template's serial, confirmed.
        "guest_attributes": {"meshjoin": {"csr": vm_csr(agent.key), "cert-serial": agent.serial,
                                          "sidecar": "running", "agent-version": "bench"}},
        "workload_entry": json.loads(placeholders(json.dumps(entry))),
    }


def startup_stub() -> str:
    """The VM's `startup-script` once the agent's text lives in project metadata (h-agent's stub when present)."""
    stub = getattr(bootstrap, "startup_stub", None)
    return stub() if stub else STAND_IN_STUB


def _own_chain(chain: str) -> str:
    """The template's chain with `@@INDEX9@@` in place of nine base64 characters inside the leaf's body."""
    lines = chain.split("\n")
    line = next(i for i, text in enumerate(lines) if i > 2 and len(text) == 64)  # a full line of the leaf
    lines[line] = lines[line][:20] + "@@INDEX9@@" + lines[line][29:]
    return "\n".join(lines)


def meshjoin_metadata_bytes(metadata: dict[str, str]) -> int:
    """Issue 16's measure: len(key) + len(value) over every item meshjoin writes (placeholders filled)."""
    filled = {"@@INDEX9@@": "0" * 9, "@@ID@@": "0" * 19, "@@IP@@": "10.128.255.255", "@@NAME@@": "fleet-00000",
              "@@ZONE@@": "us-central1-a", "@@NB@@": "2026-01-01T00:00:00Z", "@@NA@@": "2026-01-02T00:00:00Z"}
    total = 0
    for key, value in metadata.items():
        if key in names.MESHJOIN_KEYS or key in (names.STARTUP_SCRIPT_KEY, names.GUEST_ATTRIBUTES_KEY):
            for placeholder, real in filled.items():
                value = value.replace(placeholder, real)
            total += len(key) + len(value)
    return total


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
    with World.open(label=f"sweep{n}", compute_subnet=SUBNET) as world:
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


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by the live processes of one process group (the sandbox's world: every emulator)."""
    return group_cpu({"world": pgid})["world"]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _tick(world: World, n: int, scenario: str, dry_run: bool, timeout_s: float) -> dict:
    """One tick of the maintenance function in a fresh process, with the emulators' CPU and calls around it."""
    world_pgid = json.loads((world.state_dir / "pids.json").read_text())["world"]
    log_path = world.state_dir / f"sweep-{scenario}{'-dry' if dry_run else ''}.log"
    env = {**world.process_env(), **({"BENCH_SWEEP_DRY_RUN": "1"} if dry_run else {})}
    world.reset_stats()
    load_before, world_cpu0, t0 = _load(), _group_cpu_s(world_pgid), time.time()
    try:
        out = subprocess.run([sys.executable, CHILD, str(log_path), SOURCE, world.cfg.url("control")], env=env,
                             capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"n": n, "scenario": scenario, "mode": "dry-run" if dry_run else "tick",
                "timed_out_after_s": timeout_s}
    child_s, world_cpu = time.time() - t0, _group_cpu_s(world_pgid) - world_cpu0
    calls = world.stats()
    if out.returncode != 0:
        raise RuntimeError(f"sweep child failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    listing = result["phases"].get("inventory_calls", {})
    compute_lists = listing.get("compute instances.aggregatedList", 0)
    return {
        "n": n, "scenario": scenario, "mode": "dry-run" if dry_run else "tick", **result,
        "child_process_s": round(child_s, 2),
        "world_cpu_s": round(world_cpu, 2),
        "load_avg": {"before": load_before, "after": _load()},
        "calls": dict(sorted(calls.items())),
        "list_calls": sum(listing.values()),
        "compute_list_calls": compute_lists,
        "list_calls_per_500_vms": round(sum(listing.values()) / (n / 500), 2),
        "compute_list_calls_per_500_vms": round(compute_lists / (n / 500), 2),
        "other_calls": sum(calls.values()) - sum(listing.values()),
    }


def run_scale_one(n: int, scenario: str, publish: bool = False, timeout_s: float = 900) -> list[dict]:
    """A fresh sandbox holding `n` joined VMs (issue 16's metadata, four zones); one tick, or for `third-due`
    a dry-run tick (list + plan) and with `publish` a real tick after it."""
    with World.open(label=f"sweepscale{n}", compute_subnet=SCALE_SUBNET) as world:
        templates = _templates(world, issue16_metadata=True)
        zones = [f"{world.zone.rsplit('-', 1)[0]}-{suffix}" for suffix in SCALE_ZONE_SUFFIXES]
        t0 = time.monotonic()
        chunk = 1000
        for number, start in enumerate(range(0, n - 1, chunk)):
            world.control("POST", "/seed", {"zone": zones[number % len(zones)], "prefix": "fleet-", "start": start,
                                            "count": min(chunk, n - 1 - start), "vary": _vary(scenario),
                                            **templates})
        seeded = {"seed_s": round(time.monotonic() - t0, 1), "sandbox_up_s": round(world.up_seconds, 1),
                  "zones": len(zones), "metadata_bytes_per_vm": meshjoin_metadata_bytes(templates["metadata"]),
                  "startup_stub_bytes": len(templates["metadata"][names.STARTUP_SCRIPT_KEY])}
        modes = [scenario == "third-due"] + ([False] if scenario == "third-due" and publish else [])
        return [{**_tick(world, n, scenario, dry_run, timeout_s), **seeded} for dry_run in modes]


def run_scale(sizes=SCALE_SIZES, scenarios=SCALE_SCENARIOS, publish: bool = False) -> dict:
    runs = []
    for n in sizes:
        for scenario in scenarios:
            for r in run_scale_one(n, scenario, publish=publish):
                runs.append(r)
                print(f"  sweep at scale n={n} {scenario} ({r['mode']}): wall {r.get('wall_s')} s, "
                      f"cpu {r.get('cpu_s')} s, world cpu {r.get('world_cpu_s')} s, peak {r.get('peak_rss_mb')} MB, "
                      f"load {r.get('load_avg', {}).get('before')}", file=sys.stderr, flush=True)
    return {"runs": runs}


def run_scale_section(quick: bool = False) -> dict:
    """`make bench`'s section `sweep_scale` (BENCH_QUICK: small sizes)."""
    return run_scale(SCALE_QUICK_SIZES if quick else SCALE_SIZES)


def run(quick: bool = False) -> dict:
    sizes = (200, 2000) if quick else (1000, 10000)
    runs = []
    for n in sizes:
        for scenario in SCENARIOS:
            runs.append(run_one(n, scenario, timeout_s=300))
            print(f"  sweep n={n} {scenario}: {runs[-1].get('wall_s')} s", file=sys.stderr, flush=True)
    return {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.sweep --sizes 10000,30000,100000`: the scale runs, merged into bench/results.json's
    `sweep_scale` section (runs of other sizes or scenarios are kept), then BENCHMARKS.md re-rendered."""
    from . import __main__ as bench_main, report

    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=main.__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SCALE_SIZES)),
                        help="comma-separated fleet sizes (default %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCALE_SCENARIOS),
                        help="comma-separated, of: " + ", ".join(SCALE_SCENARIOS))
    parser.add_argument("--publish", action="store_true",
                        help="third-due: also run a real tick after the dry run (the sweep publishes its work)")
    parser.add_argument("--no-write", action="store_true", help="print the runs; leave results.json alone")
    args = parser.parse_args(argv)
    sizes = [int(x.replace("_", "")) for x in args.sizes.split(",") if x]
    scenarios = [x for x in args.scenarios.split(",") if x]
    unknown = set(scenarios) - set(SCALE_SCENARIOS)
    if unknown or not sizes or min(sizes) < 2:
        parser.error(f"unknown scenarios {sorted(unknown)}" if unknown else "sizes: at least 2 VMs each")
    started, load_before = time.monotonic(), _load()
    section = run_scale(sizes, scenarios, publish=args.publish)
    print(json.dumps(section, indent=2))
    if args.no_write:
        return 0
    results = json.loads(bench_main.RESULTS.read_text()) if bench_main.RESULTS.exists() else {"meta": {}, "sections": {}}
    previous = results["sections"].get("sweep_scale", {}).get("runs", [])
    fresh = {(r["n"], r["scenario"], r["mode"]) for r in section["runs"]}
    command = "python -m bench.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in section["runs"]:
        r["commit"], r["command"] = bench_main.commit(), command.strip()
    runs = [r for r in previous if (r["n"], r["scenario"], r.get("mode", "tick")) not in fresh] + section["runs"]
    runs.sort(key=lambda r: (r["scenario"], r.get("mode", "tick"), r["n"]))
    results["sections"]["sweep_scale"] = {
        "runs": runs, "seconds": round(time.monotonic() - started, 1),
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg": {"before": load_before, "after": _load()}, "quick": False}
    bench_main.RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    before = json.loads(bench_main.BEFORE.read_text()) if bench_main.BEFORE.exists() else None
    (bench_main.REPO / "BENCHMARKS.md").write_text(report.render(results, before))
    print(f"wrote {bench_main.RESULTS} and BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
