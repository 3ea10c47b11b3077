"""Child process of the sweep benchmark: one maintenance sweep, as the scheduled function runs it.

Runs in the sandbox's function environment (`Runtime.from_env()`, credentials from the sandbox metadata
server). Prints one JSON line: the summary, phase times and the peak RSS of this process.
"""

import time

T_START = time.time()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def main(log_path: str) -> None:
    from meshjoin import logs, sweep
    from meshjoin.runtime import Runtime

    # The client libraries a sweep loads, before measuring the baseline RSS.
    import google.cloud.compute_v1  # noqa: F401
    import google.cloud.container_v1  # noqa: F401
    import google.cloud.secretmanager_v1  # noqa: F401
    import kubernetes.client  # noqa: F401

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(log_path, "w") as log_file:
        logs.configure(stream=log_file)
        phases = {}
        original_inventory, original_plan = sweep.Sweeper.inventory, sweep.plan_sweep

        def timed_inventory(self):
            t0 = time.perf_counter()
            try:
                return original_inventory(self)
            finally:
                phases["inventory_s"] = round(time.perf_counter() - t0, 3)
                phases["rss_after_inventory_mb"] = round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

        def timed_plan(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original_plan(*args, **kwargs)
            finally:
                phases["plan_s"] = round(time.perf_counter() - t0, 3)

        sweep.Sweeper.inventory = timed_inventory
        sweep.plan_sweep = timed_plan
        rt = Runtime.from_env()
        t0 = time.perf_counter()
        summary = rt.sweeper.sweep()
        wall = time.perf_counter() - t0
    print(json.dumps({
        "wall_s": round(wall, 3),
        "counts": summary.counts,
        "actions_planned": len(summary.plan.actions),
        "healthy": summary.plan.healthy,
        "prune_candidates": summary.plan.prune_candidates,
        "errors": summary.errors[:5],
        "phases": phases,
        "baseline_rss_mb": round(baseline_kb / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "process_s": round(time.time() - T_START, 3),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
