"""Child process of the sweep benchmark: one maintenance sweep, as the scheduled function runs it.

Loads `functions/maintenance/main.py` with functions-framework in the sandbox's function environment
(credentials from the sandbox metadata server) and delivers one Cloud Scheduler tick through the
framework's test client. Prints one JSON line: the sweep's summary, phase times, peak RSS.
"""

import time

T_START = time.time()

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def cpu_s() -> float:
    """CPU seconds (user + system) this process used so far: its own work, whatever else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hwm_kb() -> int:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: Linux folds the parent's peak into a
    child's ru_maxrss at exec, so a child of a large benchmark process would report the parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def stats(control_url: str) -> dict:
    """The emulators' request counts by `server method` (the control plane's GET /stats)."""
    import urllib.request

    with urllib.request.urlopen(control_url + "/stats", timeout=30) as response:
        body = json.load(response)
    return {f"{server} {method}": count for server, counts in body.items() if server != "control"
            for method, count in counts.items()}


def main(log_path: str, source: str, control_url: str) -> None:
    from meshjoin import logs, sweep

    # BENCH_SWEEP_DRY_RUN=1: the tick's sweep lists and plans only (Sweeper.sweep(dry_run=True)).
    dry_run = os.environ.get("BENCH_SWEEP_DRY_RUN", "") not in ("", "0")

    baseline_kb = hwm_kb()
    with open(log_path, "w") as log_file:
        logs.configure(stream=log_file)  # before the function's own configure(): one JSON line per log, to a file
        phases, summaries = {}, []
        original_inventory, original_plan, original_sweep = sweep.Sweeper.inventory, sweep.plan_sweep, \
            sweep.Sweeper.sweep

        def timed_inventory(self):
            before = stats(control_url)
            t0, c0 = time.perf_counter(), cpu_s()
            try:
                return original_inventory(self)
            finally:
                phases["inventory_s"] = round(time.perf_counter() - t0, 3)
                phases["inventory_cpu_s"] = round(cpu_s() - c0, 3)
                after = stats(control_url)
                delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
                # The listings; the inventory's first calls also fetch a token and the cluster (not listings).
                phases["inventory_calls"] = {k: v for k, v in delta.items() if "list" in k.lower()}
                phases["inventory_other_calls"] = {k: v for k, v in delta.items() if "list" not in k.lower()}
                phases["rss_after_inventory_mb"] = round(
                    hwm_kb() / 1024, 1)

        def timed_plan(*args, **kwargs):
            t0, c0 = time.perf_counter(), cpu_s()
            try:
                return original_plan(*args, **kwargs)
            finally:
                phases["plan_s"] = round(time.perf_counter() - t0, 3)
                phases["plan_cpu_s"] = round(cpu_s() - c0, 3)

        def kept_sweep(self, **kwargs):
            summaries.append(original_sweep(self, **{**kwargs, **({"dry_run": True} if dry_run else {})}))
            return summaries[-1]

        sweep.Sweeper.inventory, sweep.plan_sweep, sweep.Sweeper.sweep = timed_inventory, timed_plan, kept_sweep
        # The scheduled function as Cloud Functions runs it: functions-framework, one tick.
        import functions_framework

        app = functions_framework.create_app(target="on_schedule", source=source, signature_type="cloudevent")
        loaded_kb = hwm_kb()
        tick = {"message": {"data": base64.b64encode(b"{}").decode(), "messageId": "bench-tick",
                            "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                "subscription": "projects/p/subscriptions/meshjoin-schedule-push"}
        t0, c0 = time.perf_counter(), cpu_s()
        response = app.test_client().post("/", json=tick)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    if not summaries:
        raise SystemExit(f"no sweep ran (HTTP {response.status_code}); see {log_path}")
    summary = summaries[-1]
    print(json.dumps({
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "dry_run": summary.dry_run,
        "sweep_s": round(summary.duration_s, 3),
        "http_status": response.status_code,
        "counts": summary.counts,
        "actions_planned": len(summary.plan.actions),
        "healthy": summary.plan.healthy,
        "prune_candidates": summary.plan.prune_candidates,
        "errors": summary.errors[:5],
        "phases": phases,
        "rss_at_start_mb": round(baseline_kb / 1024, 1),
        "rss_function_loaded_mb": round(loaded_kb / 1024, 1),
        "peak_rss_mb": round(hwm_kb() / 1024, 1),
        "compute_v1_imported": "google.cloud.compute_v1" in sys.modules,
        "process_s": round(time.time() - T_START, 3),
        "process_cpu_s": round(cpu_s(), 3),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
