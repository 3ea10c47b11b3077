"""`make bench` = `python -m bench`: every benchmark, then bench/results.json and BENCHMARKS.md.

Environment: BENCH_QUICK=1 for small sizes (a few minutes); BENCH_ONLY=keys,join,... for some
sections (the others are kept from the previous results.json, so the report stays whole).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import burst, coldstart, join, keys, report, sweep

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
# The previous design's run (per-VM secrets), rendered beside this one's figures.
BEFORE = REPO / "bench" / "results-per-vm-secrets.json"
SECTIONS = {"keys": keys.run, "join": join.run, "cold_start": coldstart.run, "burst": burst.run, "sweep": sweep.run,
            "sweep_scale": sweep.run_scale_section}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as meminfo:
        mem_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"


def main() -> int:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        print(f"BENCH_ONLY: unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    previous = json.loads(RESULTS.read_text()) if only and RESULTS.exists() else {}
    results = {"meta": {"started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": quick,
                        "command": ("BENCH_QUICK=1 " if quick else "") + (f"BENCH_ONLY={','.join(only)} " if only else "")
                        + "make bench", "machine": machine(), "commit": commit()},
               "sections": dict(previous.get("sections", {}))}
    started = time.monotonic()
    for name, run in SECTIONS.items():
        if only and name not in only:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        load_before = [round(x, 2) for x in os.getloadavg()]
        try:
            section = run(quick=quick)
        except Exception as exc:  # one failing section must not hide the others' numbers
            section = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            print(section["traceback"], file=sys.stderr)
        section["seconds"] = round(time.monotonic() - t0, 1)
        section["quick"] = quick
        section["measured"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        # The machine is shared: what else ran shows in the load averages (1, 5, 15 min) around the section.
        section["load_avg"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
        results["sections"][name] = section
        print(f"bench: {name} done in {section['seconds']} s", file=sys.stderr, flush=True)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    before = json.loads(BEFORE.read_text()) if BEFORE.exists() else None
    (REPO / "BENCHMARKS.md").write_text(report.render(results, before))
    print(f"bench: wrote {RESULTS.relative_to(REPO)} and BENCHMARKS.md in {results['meta']['seconds']} s",
          file=sys.stderr)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
