"""Cold start: a fresh process to the first event handled, beside the import floor.

Cold: `python bench/_cold_child.py event VM` loads `functions/events/main.py` with functions-framework
(as Cloud Functions does) and posts one Pub/Sub push naming a new labelled VM through the framework's
test client; the VM joins before the response. Its environment is the sandbox's function environment
(credentials from the sandbox metadata server, as on GCE).

Import floor: a fresh process importing only the client libraries the join needs (Compute, Secret
Manager, GKE ClusterManager, kubernetes, google-auth, cryptography). Also shown: importing the
framework alone, which the platform pays before any function code runs.

Timed from just before the fork to the child's last timestamp; runs alternate so noise hits all alike.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .world import World

REPO = Path(__file__).resolve().parents[1]
CHILD = str(Path(__file__).with_name("_cold_child.py"))
# The client libraries a join imports (Compute reads are REST JSON through google-auth's requests session,
# its writes go through google-cloud-compute).
FLOOR_MODULES = ["google.cloud.compute_v1", "google.auth.transport.requests", "google.cloud.secretmanager_v1",
                 "google.cloud.container_v1", "kubernetes.client", "google.auth", "cryptography.x509"]


def _child(args: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run([sys.executable, CHILD, *args], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(REPO))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {out.stderr[-2000:]}")
    marks = json.loads(out.stdout.strip().splitlines()[-1])
    marks["wall_s"] = marks["done"] - t0
    marks["interpreter_s"] = marks["start"] - t0
    marks["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for phase in ("framework_imported", "function_loaded"):
        if phase in marks:
            marks[phase + "_s"] = marks[phase] - t0
    return marks


def _median(rows: list[dict], field: str) -> float:
    return round(statistics.median(r[field] for r in rows), 3)


def run(quick: bool = False) -> dict:
    rounds = 3 if quick else 7
    with World.open(label="cold") as world:
        names = [f"cold-{i:02d}" for i in range(rounds)]
        world.create_vms(names, {"mesh": "join"}, event=False)
        env = world.process_env()
        source = str(REPO / "functions" / "events" / "main.py")
        cold, floor, framework = [], [], []
        _child(["imports", *FLOOR_MODULES], env)  # warm the page cache and .pyc files once
        for name in names:
            floor.append(_child(["imports", *FLOOR_MODULES], env))
            framework.append(_child(["imports", "functions_framework"], env))
            marks = _child(["event", name, world.zone, source], env)
            if marks["status"] != 200:
                raise RuntimeError(f"cold start event answered {marks['status']}")
            cold.append(marks)
        joined = sum(1 for n in names if _joined(world, n))
        result = {
            "rounds": rounds,
            "joined": joined,
            "cold_s": _median(cold, "wall_s"),
            "cold_cpu_s": _median(cold, "cpu_s"),
            "cold_phases_s": {
                "interpreter": _median(cold, "interpreter_s"),
                "framework_imported": _median(cold, "framework_imported_s"),
                "function_loaded": _median(cold, "function_loaded_s"),
                "first_event_handled": _median(cold, "wall_s"),
            },
            "cold_maxrss_mb": round(statistics.median(r["maxrss_kb"] for r in cold) / 1024, 1),
            "import_floor_s": _median(floor, "wall_s"),
            "import_floor_cpu_s": _median(floor, "cpu_s"),
            "framework_import_s": _median(framework, "wall_s"),
            "floor_modules": FLOOR_MODULES,
        }
        result["difference_s"] = round(result["cold_s"] - result["import_floor_s"], 3)
        result["samples"] = {"cold_s": [round(r["wall_s"], 3) for r in cold],
                             "import_floor_s": [round(r["wall_s"], 3) for r in floor],
                             "framework_import_s": [round(r["wall_s"], 3) for r in framework]}
        return result


def _joined(world: World, name: str) -> bool:
    from .world import status_of

    # meshjoin's part is done at `waiting`; the VM's agent confirms later (`joined`).
    return status_of(world.get_vm(name)).get("state") in ("waiting", "joined")
