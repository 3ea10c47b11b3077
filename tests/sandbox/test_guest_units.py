"""The sandbox plays systemd's part for meshjoin-watch.service only: `systemctl start|restart` in a guest runs
the unit's ExecStart from the VM's root in the background, and nothing a guest started outlives the VM's
stop, reset or deletion, or the sandbox itself. Through the unmodified google-cloud-compute client."""

from __future__ import annotations

import os
from pathlib import Path

from google.cloud import compute_v1

from .test_lifecycle import ZONE, gce, insert, server, wait_for, wait_op  # noqa: F401 (fixtures)

WATCHER = """#!/bin/bash
echo "watching as $$ in $MESHJOIN_ROOT with $*"
echo $$ >> "$MESHJOIN_ROOT/watch-pids"
sleep 300 &
echo $! >> "$MESHJOIN_ROOT/child-pids"
wait
"""


def startup(restart_sec: str = "30", action: str = "start") -> str:
    """A startup script that installs a watcher unit (as the agent does) and starts it twice."""
    return f"""#!/bin/bash
set -e
mkdir -p "$MESHJOIN_ROOT/etc/systemd/system" "$MESHJOIN_ROOT/usr/local/sbin"
cat > "$MESHJOIN_ROOT/usr/local/sbin/meshjoin-agent" <<'AGENT'
{WATCHER}AGENT
chmod 0755 "$MESHJOIN_ROOT/usr/local/sbin/meshjoin-agent"
cat > "$MESHJOIN_ROOT/etc/systemd/system/meshjoin-watch.service" <<'UNIT'
[Unit]
Description=test watcher
[Service]
ExecStart=/usr/local/sbin/meshjoin-agent watch
Restart=always
RestartSec={restart_sec}
UNIT
systemctl {action} meshjoin-watch.service
systemctl {action} meshjoin-watch.service
systemctl start istio.service
"""


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed grandchild may wait for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids(root: Path, name: str) -> list[int]:
    path = root / name
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def booted(gce, name: str, count: int) -> Path:
    serial = gce.guests.vm_dir(ZONE, name) / "serial.log"
    wait_for(lambda: serial.exists() and serial.read_text().count("startup-script exit status 0") == count,
             what=f"boot {count} of {name}")
    return gce.guests.vm_dir(ZONE, name) / "root"


def watchers_started(root: Path, count: int) -> None:
    """Type=simple: `systemctl start` returns once the watcher is forked, before it has written its pids."""
    wait_for(lambda: len(pids(root, "watch-pids")) >= count and len(pids(root, "child-pids")) >= count,
             what=f"watcher {count} to record its pids")


def everything_ended(root: Path) -> bool:
    return not any(alive(pid) for pid in pids(root, "watch-pids") + pids(root, "child-pids"))


def test_start_launches_the_unit_once_in_the_vms_root_and_restart_replaces_it(gce):
    insert(gce, "unit-1", metadata={"startup-script": startup()})
    root = booted(gce, "unit-1", 1)
    # Type=simple: `systemctl start` returns once the process is forked, before it has written anything
    watchers_started(root, 1)
    assert len(pids(root, "watch-pids")) == 1  # started once: the second `start` found it running
    (first,) = pids(root, "watch-pids")
    assert alive(first) and gce.guests.unit_pids(ZONE, "unit-1") == {"meshjoin-watch.service": first}
    serial = (root.parent / "serial.log").read_text()
    assert f"meshjoin-watch[{first}]: watching as {first} in {root} with watch" in serial
    calls = (root.parent / "log" / "systemctl").read_text().splitlines()
    assert calls == ["start meshjoin-watch.service", "start meshjoin-watch.service", "start istio.service"]
    assert set(gce.guests.unit_pids(ZONE, "unit-1")) == {"meshjoin-watch.service"}  # istio.service: recorded only

    wait_op(gce, gce.instances.set_metadata_unary(
        project=gce.project, zone=ZONE, instance="unit-1", metadata_resource=compute_v1.Metadata(
            fingerprint=gce.instances.get(project=gce.project, zone=ZONE, instance="unit-1").metadata.fingerprint,
            items=[compute_v1.Items(key="startup-script", value=startup(action="restart"))])))
    assert gce.guests.run_startup(ZONE, "unit-1")["returncode"] == 0
    watchers_started(root, 3)
    watchers = pids(root, "watch-pids")
    assert len(watchers) == 3  # each restart replaced the one before
    assert [alive(pid) for pid in watchers] == [False, False, True]
    assert [alive(pid) for pid in pids(root, "child-pids")] == [False, False, True]  # its whole process group


def test_stop_reset_and_delete_end_what_runs_in_the_guest(gce):
    insert(gce, "unit-2", metadata={"startup-script": startup()})
    root = booted(gce, "unit-2", 1)
    watchers_started(root, 1)
    wait_op(gce, gce.instances.stop_unary(project=gce.project, zone=ZONE, instance="unit-2"))
    assert everything_ended(root) and gce.guests.unit_pids(ZONE, "unit-2") == {}

    wait_op(gce, gce.instances.start_unary(project=gce.project, zone=ZONE, instance="unit-2"))
    booted(gce, "unit-2", 2)
    watchers_started(root, 2)
    assert [alive(pid) for pid in pids(root, "watch-pids")] == [False, True]
    wait_op(gce, gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="unit-2"))
    booted(gce, "unit-2", 3)
    watchers_started(root, 3)
    assert [alive(pid) for pid in pids(root, "watch-pids")] == [False, False, True]

    wait_op(gce, gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="unit-2"))
    assert everything_ended(root) and gce.guests.unit_pids(ZONE, "unit-2") == {}


def test_a_unit_that_exits_is_restarted_as_its_unit_file_says(gce):
    insert(gce, "unit-3", metadata={"startup-script": startup(restart_sec="0.2")})
    root = booted(gce, "unit-3", 1)
    watchers_started(root, 1)
    (first,) = pids(root, "watch-pids")
    os.kill(first, 9)  # the main process dies; Restart=always brings it back after RestartSec
    wait_for(lambda: len(pids(root, "watch-pids")) == 2 and alive(pids(root, "watch-pids")[1]),
             what="the restarted watcher")
    assert "meshjoin-watch.service: main process exited, status -9" in (root.parent / "serial.log").read_text()


def test_shutdown_leaves_no_guest_process(gce):
    for name in ("unit-4", "unit-5"):
        insert(gce, name, metadata={"startup-script": startup()})
    roots = [booted(gce, name, 1) for name in ("unit-4", "unit-5")]
    for root in roots:
        watchers_started(root, 1)
    assert all(alive(pids(root, "watch-pids")[0]) for root in roots)
    gce.guests.shutdown()
    assert all(everything_ended(root) for root in roots)


def test_only_start_and_restart_of_the_watcher_unit_are_run(gce):
    insert(gce, "unit-6", metadata={"startup-script": "#!/bin/bash\nsystemctl restart istio.service\n"})
    booted(gce, "unit-6", 1)
    assert gce.guests.unit_pids(ZONE, "unit-6") == {}
    url = gce.guests.env(ZONE, "unit-6")["MESHJOIN_SANDBOX_SYSTEMD"]
    import requests

    refused = requests.post(url, data="start istio.service", timeout=5)
    assert refused.status_code == 400 and "meshjoin-watch.service" in refused.json()["error"]
    missing = requests.post(url, data="start meshjoin-watch.service", timeout=5)  # no unit file in its root
    assert missing.status_code == 400 and "not found" in missing.json()["error"]


def test_an_enabled_unit_starts_at_every_boot_even_without_the_script(gce):
    script = startup().replace("systemctl start istio.service", "systemctl enable meshjoin-watch.service")
    insert(gce, "unit-7", metadata={"startup-script": script})
    root = booted(gce, "unit-7", 1)
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="unit-7")
    wait_op(gce, gce.instances.set_metadata_unary(
        project=gce.project, zone=ZONE, instance="unit-7", metadata_resource=compute_v1.Metadata(
            fingerprint=vm.metadata.fingerprint, items=[compute_v1.Items(key="startup-script", value="true")])))
    wait_op(gce, gce.instances.reset_unary(project=gce.project, zone=ZONE, instance="unit-7"))
    booted(gce, "unit-7", 2)
    watchers_started(root, 2)
    watchers = pids(root, "watch-pids")
    assert len(watchers) == 2 and [alive(pid) for pid in watchers] == [False, True]
    assert gce.guests.unit_pids(ZONE, "unit-7") == {"meshjoin-watch.service": watchers[1]}
