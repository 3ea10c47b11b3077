"""BENCHMARKS.md from bench/results.json: every number in it comes from the results of one run."""

from __future__ import annotations

MINIMUM_CALLS = [
    ("compute instances.get", "read the VM: labels and metadata are not in the audit entry"),
    ("secretmanager secrets.create", "the VM's own secret"),
    ("secretmanager secrets.setIamPolicy", "only the VM's service account may read it"),
    ("secretmanager secrets.versions.add", "the key and chain"),
    ("kubernetes get serviceaccounts", "the identity's ServiceAccount exists (a create when it does not)"),
    ("kubernetes create workloadentries", "register the VM"),
    ("compute instances.setMetadata", "bootstrap items + meshjoin-status, written last"),
    ("compute zoneOperations.wait", "setMetadata is an operation: done before the event is acked"),
]
MINIMUM = len(MINIMUM_CALLS)


def _fmt(value, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        value = round(value, digits)
    return f"{value}{unit}"


def _when(seconds: float) -> str:
    return "not all joined by the deadline" if seconds == float("inf") else f"{seconds} s"


def _verdict(ok) -> str:
    return "—" if ok is None else ("**met**" if ok else "**missed**")


def _sections(results: dict) -> dict:
    return results.get("sections", {})


def targets(results: dict) -> list[tuple[str, str, str, str]]:
    s = _sections(results)
    rows = []
    j = s.get("join", {})
    if "join" in j:
        rows.append(("warm join p50 ≤ 1.5× floor p50",
                     f"{j['join']['p50_ms']} ms vs {j['floor']['p50_ms']} ms = {j['ratio_p50']}×",
                     _verdict(j["ratio_p50"] <= 1.5), ""))
        rows.append(("warm join p99 ≤ 3× floor p99",
                     f"{j['join']['p99_ms']} ms vs {j['floor']['p99_ms']} ms = {j['ratio_p99']}× "
                     f"({j['ratio_p99_to_floor_p50']}× the floor's p50)",
                     _verdict(j["ratio_p99"] <= 3), ""))
        rows.append((f"API calls per join ≤ the minimum ({MINIMUM}, listed below)",
                     f"{j['calls_per_join_total']}", _verdict(j["calls_per_join_total"] <= MINIMUM), ""))
    c = s.get("cold_start", {})
    if "cold_s" in c:
        rows.append(("cold start ≤ import floor + 0.3 s",
                     f"{c['cold_s']} s vs {c['import_floor_s']} s: {c['difference_s']:+} s "
                     f"(CPU {c['cold_cpu_s']} s vs {c['import_floor_cpu_s']} s)",
                     _verdict(c["difference_s"] <= 0.3),
                     f"medians of alternating runs; functions-framework's import alone is {c['framework_import_s']} s"))
    b = s.get("burst", {})
    if b.get("runs"):
        n = max(r["n"] for r in b["runs"])
        runs = [r for r in b["runs"] if r["n"] == n]
        times = sorted(r["time_to_all_joined_s"] if r["all_joined"] else float("inf") for r in runs)
        median = times[len(times) // 2]
        lost, dup = sum(r["lost"] for r in runs), sum(r["duplicates"] for r in runs)
        ok = median <= 60 and lost == 0 and dup == 0
        rows.append((f"{n}-VM burst joined ≤ 60 s, 0 lost, 0 duplicates",
                     (f"median {_when(median)} of {len(runs)} runs ({', '.join(_when(t) for t in times)}), "
                      if len(runs) > 1 else f"{_when(median)}, ")
                     + f"lost {lost}, duplicates {dup}",
                     _verdict(ok), "through the Pub/Sub emulator, whose push loop sets the pace (below)"))
    sw = s.get("sweep", {})
    runs = [r for r in sw.get("runs", []) if r.get("scenario") == "nothing-due" and "wall_s" in r]
    if runs:
        big = max(runs, key=lambda r: r["n"])
        rows.append((f"{big['n']:,}-VM sweep, nothing due ≤ 30 s", f"{big['wall_s']} s", _verdict(big["wall_s"] <= 30),
                     ""))
        rows.append(("≤ 2 list calls per 500 VMs", f"{big['list_calls']} list calls = {big['list_calls_per_500_vms']}"
                     " per 500 VMs", _verdict(big["list_calls_per_500_vms"] <= 2), ""))
        peaks = [r for r in sw.get("runs", []) if "peak_rss_mb" in r and r["n"] == big["n"]]
        worst = max(peaks, key=lambda r: r["peak_rss_mb"])
        rows.append(("sweep peak RSS ≤ 300 MB", f"{worst['peak_rss_mb']} MB (worst scenario: {worst['scenario']})",
                     _verdict(worst["peak_rss_mb"] <= 300), "VmHWM of the sweeping function process"))
    return rows


def render(results: dict) -> str:
    meta = results["meta"]
    s = _sections(results)
    m = meta["machine"]
    quick = [name for name, section in s.items() if section.get("quick")]
    out = [
        "# Benchmarks",
        "",
        f"Measured by `{meta['command']}` on {meta['started']} ({m['cpus']} cores, {m['cpu']}, {m['memory_gb']} GB, "
        f"Python {m['python']}; load average at start {m['load_avg_at_start']}), {meta['seconds']} s in all"
        + (f" — **quick mode (small sizes, not the issue's N) for: {', '.join(quick)}**" if quick else "") + ".",
        "Every number below is from that run (`bench/results.json` holds all of them). Each measurement stands "
        "beside its floor from the same run: the machine is shared and noisy, ratios are what to compare.",
        "`BENCH_QUICK=1 make bench` runs small sizes in a few minutes; `BENCH_ONLY=join,sweep make bench` re-runs "
        "some sections and keeps the others' last results. Profilers for investigations: "
        "`.venv/bin/pip install -r bench/requirements.txt`.",
        "",
        "## Where we stand",
        "",
        "| target | measured | | note |",
        "|---|---|---|---|",
    ]
    for target, measured, verdict, note in targets(results):
        out.append(f"| {target} | {measured} | {verdict} | {note} |")
    loads = [f"{name} {sec['load_avg']['before'][0]} → {sec['load_avg']['after'][0]}" for name, sec in s.items()
             if "load_avg" in sec]
    if loads:
        floor = s.get("join", {}).get("floor", {}).get("p50_ms")
        out += ["", "1-minute load average before → after each section (2 cores; other work on the machine shows "
                "here): " + "; ".join(loads) + "."
                + (f" Absolute times (burst, sweep) move with the machine's speed at the time; this run's warm-join "
                   f"floor, {floor} ms, is the yardstick to compare runs by." if floor else "")]
    out += _errors(s)
    out += _join(s.get("join", {}))
    out += _cold(s.get("cold_start", {}))
    out += _burst(s.get("burst", {}))
    out += _sweep(s.get("sweep", {}))
    out += _keys(s.get("keys", {}))
    out += FINDINGS
    return "\n".join(out) + "\n"


def _errors(s: dict) -> list[str]:
    failed = [(name, sec["error"]) for name, sec in s.items() if "error" in sec]
    if not failed:
        return []
    return ["", "**Sections that failed in this run:** " + "; ".join(f"{n}: {e}" for n, e in failed)]


def _join(j: dict) -> list[str]:
    if "join" not in j:
        return []
    out = ["", "## Warm join", "",
           f"`Reconciler.reconcile(key)` of a new labelled VM, in a process whose clients are built and CA cached "
           f"({j['samples']} samples, outcomes {j['verbs']}). The **floor** replays, per sample, the same round trips "
           "the join just made (same kinds and count, same emulators, same paths and body sizes) as bare keep-alive "
           "HTTP requests, plus key generation and signing with `pki`; samples alternate join / floor.",
           "",
           "| | p50 | p99 | mean | min | max |",
           "|---|---|---|---|---|---|"]
    for label in ("join", "floor"):
        r = j[label]
        out.append(f"| {label} | {r['p50_ms']} ms | {r['p99_ms']} ms | {r['mean_ms']} ms | {r['min_ms']} ms | "
                   f"{r['max_ms']} ms |")
    out += ["", f"Ratio join/floor: p50 **{j['ratio_p50']}×**, p99 **{j['ratio_p99']}×**.", "",
            f"API calls per join (mean over the samples): **{j['calls_per_join_total']}**; the minimum the design "
            f"needs is **{MINIMUM}**:", "",
            "| call | per join | why the design needs it |", "|---|---|---|"]
    calls = dict(j["calls_per_join"])
    for kind, why in MINIMUM_CALLS:
        out.append(f"| {kind} | {calls.pop(kind, 0)} | {why} |")
    for kind, count in calls.items():
        out.append(f"| {kind} | {count} | beyond the minimum |")
    out += ["", "A VM serving ports adds the app's Service (a get, and a create for the first VM of the app); the "
            "first VM of an identity adds the ServiceAccount's create."]
    return out


def _cold(c: dict) -> list[str]:
    if "cold_s" not in c:
        return []
    p = c["cold_phases_s"]
    return ["", "## Cold start", "",
            "A fresh `python` loads `functions/events/main.py` with functions-framework and handles one Pub/Sub push "
            "naming a new labelled VM (the VM joins before the response), credentials from the sandbox metadata "
            "server. The **import floor** is a fresh process importing only the client libraries a join needs: "
            f"`{', '.join(c['floor_modules'])}`. Medians of {c['rounds']} alternating rounds "
            f"({c['joined']}/{c['rounds']} VMs joined).",
            "",
            "| | wall | CPU |", "|---|---|---|",
            f"| cold start: fork → first event handled | {c['cold_s']} s | {c['cold_cpu_s']} s |",
            f"| import floor | {c['import_floor_s']} s | {c['import_floor_cpu_s']} s |",
            f"| functions-framework import alone (the platform's) | {c['framework_import_s']} s | |",
            "",
            f"Difference: **{c['difference_s']:+} s** wall. Phases of the cold run (from the fork): interpreter up "
            f"{p['interpreter']} s, functions-framework imported {p['framework_imported']} s, function loaded "
            f"{p['function_loaded']} s, first event handled {p['first_event_handled']} s. Peak RSS "
            f"{c['cold_maxrss_mb']} MB.",
            "",
            "What the difference is made of (medians): loading the framework and meshjoin's modules "
            f"**{round(p['function_loaded'] - p['interpreter'], 3)} s** (the framework alone "
            f"{c['framework_import_s']} s in its own process; Cloud Functions loads it before any function code); "
            f"the first event **{round(p['first_event_handled'] - p['function_loaded'], 3)} s**, i.e. "
            f"{round(p['first_event_handled'] - p['function_loaded'] - c['import_floor_s'], 3):+} s beyond the "
            "import floor: the client libraries are imported when the first client is built (nothing at module "
            "level), and the rest is the first event's round trips (token, `clusters.get`, the CA's four secrets "
            "and version list, the join's eight calls, each Kubernetes call a fresh TLS handshake here) and "
            "signing. The client libraries dominate: Compute's alone loads every type of the API. "
            "Beyond the floor, the framework's import is the platform's; meshjoin's share is its own modules "
            f"(~{round(p['function_loaded'] - p['interpreter'] - c['framework_import_s'], 3)} s) plus the first "
            f"event's work beyond the floor ({round(p['first_event_handled'] - p['function_loaded'] - c['import_floor_s'], 3)} s)"
            f" = **{round(p['function_loaded'] - p['interpreter'] - c['framework_import_s'] + p['first_event_handled'] - p['function_loaded'] - c['import_floor_s'], 3)} s**. "
            "Samples: " + str(c["samples"]) + "."]


def _burst(b: dict) -> list[str]:
    if "runs" not in b:
        return []
    out = ["", "## Burst", "",
           "N labelled VMs created at once (16 concurrent `instances.insert`); each insert's two audit entries go "
           "through the sink, the real Pub/Sub emulator's push subscription and functions-framework to the event "
           "function (1 worker, gthread). The function is warmed by one join first. Joined = its `registered` log "
           "line (written after the status); then the emulators are checked: `meshjoin-status` joined, one "
           "WorkloadEntry and secret version 1 per VM (duplicates = more than one certificate or entry).",
           "",
           "| N | threads | all joined after | half joined after | joins/s | lost | duplicates | CPU s: function / "
           "emulators / Pub/Sub | calls per VM |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in b["runs"]:
        cpu = r["cpu_s"]
        calls = sum(v for k, v in r["calls_per_vm"].items() if k != "compute instances.insert")
        out.append(f"| {r['n']} | {r['function_threads']} | {_fmt(r['time_to_all_joined_s'], ' s')}"
                   f"{'' if r['all_joined'] else ' (deadline ' + str(r['deadline_s']) + ' s: ' + str(r['joined_by_deadline']) + ' joined)'}"
                   f" | {_fmt(r['time_to_half_joined_s'], ' s')} | {r['joins_per_s']} | {r['lost']} | {r['duplicates']} | "
                   f"{cpu.get('events_fn')} / {cpu.get('world')} / {cpu.get('pubsub')} | {round(calls, 2)} |")
    d = b.get("direct")
    if d:
        out += ["", f"**The function's own capacity** (same sandbox, no Pub/Sub emulator): {d['n']} pushes posted "
                f"straight to the function, {d['concurrency']} at a time as real Pub/Sub push keeps many outstanding: "
                f"all handled in **{d['time_to_all_handled_s']} s** ({d['joins_per_s']} joins/s), lost {d['lost']}, "
                f"duplicates {d['duplicates']}, HTTP {d['http_statuses']}."]
    out += ["", "The Pub/Sub emulator's push loop bounds a sandbox burst: its `PushLoop` (in the emulator's jar) "
            "pulls one message, POSTs it, waits for the answer, acks and loops, and in a profiling run of a 400-VM "
            "burst py-spy dumps of the function worker never showed more than two events in flight, whatever the "
            "function's thread count. A burst through it takes about N × one event's latency / 2, so it moves with "
            "every millisecond the machine adds to a join (see the warm-join floor of the same run). Production push "
            "keeps many requests outstanding, which the direct run above stands in for; on two shared cores it is "
            "bounded by CPU instead (function, emulators and Pub/Sub emulator on the same cores)."]
    return out


def _sweep(sw: dict) -> list[str]:
    if "runs" not in sw:
        return []
    out = ["", "## Sweep", "",
           "A fleet of N registered VMs seeded straight into the emulators from what one real join wrote (instance "
           "metadata of ~23 kB incl. the startup script, a per-VM secret with its IAM binding, a WorkloadEntry), a "
           "fresh sandbox per scenario. One tick of the maintenance function in a fresh process (functions-framework "
           "test client, function environment). Defaults: `MESHJOIN_SWEEP_RENEWALS=200` renewals per sweep (Secret "
           "Manager's write quota), `MESHJOIN_PRUNE_CAP=50`, 8 workers. Peak RSS is the process's VmHWM (its "
           "`ru_maxrss` would include the benchmark parent's, which Linux folds in at exec).",
           "",
           "| N | scenario | wall | inventory | list calls (per 500 VMs) | other calls | renewed / pruned / deferred | "
           "peak RSS | RSS after loading |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sw["runs"]:
        if "wall_s" not in r:
            out.append(f"| {r['n']} | {r['scenario']} | timed out after {r.get('timed_out_after_s')} s | | | | | | |")
            continue
        k = r["counts"]
        out.append(f"| {r['n']:,} | {r['scenario']} | {r['wall_s']} s | {r['phases'].get('inventory_s')} s | "
                   f"{r['list_calls']} ({r['list_calls_per_500_vms']}) | {r['other_calls']} | "
                   f"{k['renewed']} / {k['pruned']} / {k['deferred']} | {r['peak_rss_mb']} MB | "
                   f"{r['rss_function_loaded_mb']} MB |")
    by = {(r["n"], r["scenario"]): r for r in sw["runs"] if "wall_s" in r}
    sizes = sorted({n for n, _ in by})
    if len(sizes) == 2:
        small, big = sizes
        out += ["", f"Growth from {small:,} to {big:,} VMs (×{big // small}):", "",
                "| scenario | wall | list calls | other calls | peak RSS |", "|---|---|---|---|---|"]
        for scenario in ("nothing-due", "third-due", "tenth-deleted"):
            a, b = by.get((small, scenario)), by.get((big, scenario))
            if a and b:
                out.append(f"| {scenario} | ×{round(b['wall_s'] / a['wall_s'], 1)} | "
                           f"{a['list_calls']} → {b['list_calls']} | {a['other_calls']} → {b['other_calls']} | "
                           f"{a['peak_rss_mb']} → {b['peak_rss_mb']} MB |")
        base, renew, prune = by.get((big, "nothing-due")), by.get((big, "third-due")), by.get((big, "tenth-deleted"))
        costs = []
        if base and renew and renew["counts"]["renewed"]:
            costs.append(f"a renewal {round((renew['other_calls'] - base['other_calls']) / renew['counts']['renewed'], 1)}")
        if base and prune and prune["counts"]["pruned"]:
            costs.append(f"a prune {round((prune['other_calls'] - base['other_calls']) / prune['counts']['pruned'], 1)}")
        out += ["", "Listings grow with N in pages (Compute: 500 VMs a page, its maximum; WorkloadEntries and Services "
                "5,000; per-VM secrets 25,000); per-VM calls grow only with the VMs that need something, and are "
                "capped per sweep. The other calls of a sweep with nothing due are the CA's (four secret reads and a "
                "version list), `clusters.get` and the metadata server's token."
                + (f" Calls per action at {big:,} VMs: {', '.join(costs)}." if costs else "")]
    example = next((r for r in sw["runs"] if r.get("scenario") == "third-due" and "calls" in r), None)
    if example:
        out += ["", f"Calls of the {example['n']:,}-VM third-due sweep: "
                + ", ".join(f"{k} {v}" for k, v in example["calls"].items()) + "."]
    return out


def _keys(k: dict) -> list[str]:
    if "rows" not in k:
        return []
    out = ["", "## Key algorithms", "",
           "`pki.issue_workload_cert` (fresh key + leaf signed by the plug-in CA) in one thread, under three CAs: "
           "the sandbox's ECDSA P-256, an RSA-2048 one, and RSA-4096, what Istio's `tools/certs` Makefiles make by "
           "default.", "",
           "| plug-in CA | leaf key | issuances/s | p50 per issuance | p50 key generation alone |",
           "|---|---|---|---|---|"]
    for r in k["rows"]:
        out.append(f"| {r['ca']} | {r['leaf']} | {r['issuance']['per_second']} | {r['issuance']['p50_ms']} ms | "
                   f"{r['keygen']['p50_ms']} ms |")
    out += ["", "ECDSA P-256 is the default: its key generation costs next to nothing, so issuance is bounded by the "
            "CA's signature, while an RSA-2048 leaf spends most of its time finding primes (and its time varies "
            "widely), at a cost a burst of joins would pay on every VM. (istio-agent's own key for the certificates "
            "it rotates on the VM is RSA-2048 unless `ECC_SIGNATURE_ALGORITHM=ECDSA`: that cost is the VM's, once "
            "per rotation.)"]
    return out


FINDINGS = ["", "## What was found, what was changed, what is left", "",
            "Profiling (py-spy on the function worker, the world process and the sweeping process; pyinstrument on "
            "a cold start) was done in separate runs while building this benchmark; the figures quoted in this "
            "section come from those runs, not from the run above.",
            "",
            "Fixed in meshjoin (`shared/meshjoin/`):",
            "- **The sweep parsed ~23 kB of metadata per VM through protobuf's JSON parser**, which runs a regex over "
            "every string: 73 % of a 10,000-VM sweep's samples, and that sweep took 31.8 s with nothing due. "
            "`ComputeAdapter.list_vms` now reads the aggregatedList pages as plain JSON (`vm_from_json`), and "
            "metadata values of 1 kB or more that repeat across VMs (the startup script) are kept once per listing.",
            "- **Every sweep imported google-cloud-compute** (149 MB of RSS in a process that imports it alone, over "
            "a second of CPU): the Compute clients are now built on first use, so a sweep that only lists never "
            "loads it (the renewing and pruning sweeps do).",
            "- **Three list calls per 500 VMs**: WorkloadEntries and Services are now listed 5,000 a page and per-VM "
            "secrets 25,000 a page (Secret Manager's maximum); Compute's 500 is its own maximum.",
            "- **A first join made 10 calls where 8 do**: the IAM policy of a secret the same pass just created is "
            "set without reading it (it is empty); a WorkloadEntry the status does not name yet is created without "
            "a GET first (a 409 falls back to read-and-replace, so a leftover entry is still replaced); the "
            "new clean-up of undelivered secret versions skips its list after a first mint (version 1, made by the "
            "same pass: nothing is older, and anything newer is younger than `ORPHAN_VERSION_AGE`).",
            "",
            "The emulators' and libraries', left as they are:",
            "- The Pub/Sub emulator's push loop (above) sets the pace of sandbox bursts.",
            "- werkzeug's development server, under every emulator, closes each connection after one answer "
            "(`Connection: close`), so every call to the Kubernetes emulator pays a TLS handshake on both sides: "
            "handshakes and connects were about a quarter of the function worker's samples during a burst. Real API "
            "servers keep connections alive. The floors pay the same, so the ratios are fair; the absolute "
            "latencies are the sandbox's.",
            "- The Kubernetes emulator validates every WorkloadEntry with the CRD's CEL rules in Python, and the "
            "Secret Manager emulator computes CRC32C in pure Python: the world process's CPU in the burst table.",
            "- google-cloud-compute loads every type of the API at import: most of the cold start and of a renewing "
            "sweep's RSS.",
            "- functions-framework's own import (the platform's) is most of the cold start's distance to the floor.",
            "",
            "Left in meshjoin, on purpose: a renewal still calls `secrets.create` (409) and `getIamPolicy` before "
            "adding the version. They are idempotent guards that also repair a deleted secret or a widened policy, "
            "and renewals are capped per sweep."]
