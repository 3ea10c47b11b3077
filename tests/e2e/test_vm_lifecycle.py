"""Real gcloud against the sandbox's Compute Engine, and the VM's life: boot, stop, start, reboot and
the startup script that runs at boot only, in the VM's own root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import wait_for


@pytest.fixture
def gcloud(sandbox, tmp_path):
    """`gcloud` with the env file sourced and the operator's token in a file."""
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed")
    token = tmp_path / "token"
    token.write_text(sandbox.config["admin_token"])
    env = {**sandbox.env, "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token), "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "false"}

    def run(*args: str, check: bool = True):
        import subprocess

        result = subprocess.run(["gcloud", *args], env=env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"gcloud {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    return run


def test_gcloud_add_labels_joins_through_the_audit_log_and_describe_list_remove_delete_work(sandbox, gcloud):
    sandbox.meshjoin("sandbox", "create-vm", "gc-1", "--service-account",
                     "gc-1@meshjoin-sandbox.iam.gserviceaccount.com")
    zone = ["--zone", sandbox.zone]
    gcloud("compute", "instances", "add-labels", "gc-1", "--labels=mesh=join", *zone)
    # meshjoin's part; the VM was running when labelled, so GCE has not run the agent: the status says so.
    waiting = wait_for(lambda: (s := sandbox.status("gc-1")).get("state") == "waiting" and s, what="gc-1 waiting")
    assert "google_metadata_script_runner startup" in waiting["reason"]
    # The remedy the status gives, as the VM owner would run it: the real agent runs in the VM's root,
    # reports through guest attributes and nudges meshjoin, which then registers the VM.
    sandbox.meshjoin("sandbox", "run-startup", "gc-1")
    status = wait_for(lambda: (s := sandbox.status("gc-1")).get("state") == "joined" and s, timeout=60,
                      what="gc-1 joined after its agent confirmed")
    root = Path(sandbox.meshjoin("sandbox", "vm-root", "gc-1").stdout.strip())
    assert (root / "etc/certs/cert-chain.pem").is_file() and (root / "etc/certs/key.pem").is_file()
    # The event came from the audit entries of gcloud's setLabels (first ignored, last acted on).
    assert any("first entry of v1.compute.instances.setLabels" in e.get("message", "")
               for e in sandbox.function_log())
    assert [e for e in sandbox.logged("gc-1", "registered") if e.get("message_id")]

    described = json.loads(gcloud("compute", "instances", "describe", "gc-1", *zone, "--format=json").stdout)
    assert described["status"] == "RUNNING" and described["labels"] == {"mesh": "join"}
    shown = gcloud("compute", "instances", "describe", "gc-1", *zone,
                   "--format=value(metadata.items.meshjoin-status)").stdout
    assert json.loads(shown)["identity"] == status["identity"]
    listed = json.loads(gcloud("compute", "instances", "list", "--format=json").stdout)
    assert "gc-1" in [vm["name"] for vm in listed]

    gcloud("compute", "instances", "remove-labels", "gc-1", "--labels=mesh", *zone)
    wait_for(lambda: sandbox.status("gc-1").get("state") == "left", what="gc-1 left")
    gcloud("compute", "instances", "delete", "gc-1", *zone, "--quiet")
    assert sandbox.vm("gc-1") is None
    missing = gcloud("compute", "instances", "describe", "gc-1", *zone, check=False)
    assert missing.returncode != 0 and "was not found" in missing.stderr


SCRIPT = 'echo "boot $(date +%s%N)" >> "$MESHJOIN_ROOT/boots"\n'


def boots(root: Path) -> int:
    path = root / "boots"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_startup_script_runs_at_boot_only_and_the_power_verbs(sandbox):
    sandbox.meshjoin("sandbox", "create-vm", "life-1", "--metadata", f"startup-script={SCRIPT}")
    root = Path(sandbox.meshjoin("sandbox", "vm-root", "life-1").stdout.strip())
    assert root.is_dir() and root.name == "root" and "life-1" in str(root)
    wait_for(lambda: boots(root) == 1, what="the first boot's startup script")

    sandbox.meshjoin("sandbox", "set-labels", "life-1", "color=red")  # not a boot
    sandbox.meshjoin("sandbox", "stop", "life-1")
    assert sandbox.vm("life-1")["status"] == "TERMINATED"
    refused = sandbox.meshjoin("sandbox", "run-startup", "life-1", check=False)
    assert refused.returncode != 0 and "TERMINATED" in refused.stderr
    assert boots(root) == 1
    sandbox.meshjoin("sandbox", "start", "life-1")
    assert sandbox.vm("life-1")["status"] == "RUNNING"
    wait_for(lambda: boots(root) == 2, what="the start's boot")
    sandbox.meshjoin("sandbox", "reboot", "life-1")
    wait_for(lambda: boots(root) == 3, what="the reboot's boot")
    ran = sandbox.meshjoin("sandbox", "run-startup", "life-1")
    assert "exited 0" in ran.stdout and boots(root) == 4
    serial = (root.parent / "serial.log").read_text()
    assert serial.count("startup-script exit status 0") == 4


def test_project_startup_script_runs_unless_the_instance_has_its_own(sandbox, gcloud):
    """Common instance metadata through real gcloud; the instance's item takes precedence at boot."""
    project_script = 'echo project >> "$MESHJOIN_ROOT/who"\n'
    gcloud("compute", "project-info", "add-metadata", f"--metadata=startup-script={project_script}")
    described = json.loads(gcloud("compute", "project-info", "describe", "--format=json").stdout)
    items = {i["key"]: i["value"] for i in described["commonInstanceMetadata"]["items"]}
    assert items["startup-script"] == project_script
    try:
        sandbox.meshjoin("sandbox", "create-vm", "proj-1")
        sandbox.meshjoin("sandbox", "create-vm", "own-1", "--metadata",
                         'startup-script=echo own >> "$MESHJOIN_ROOT/who"')
        for name, expected in (("proj-1", "project"), ("own-1", "own")):
            root = Path(sandbox.meshjoin("sandbox", "vm-root", name).stdout.strip())
            wait_for(lambda: (root / "who").exists() and (root / "who").read_text(), what=f"{name}'s boot")
            assert (root / "who").read_text() == f"{expected}\n"
    finally:
        gcloud("compute", "project-info", "remove-metadata", "--keys=startup-script")
