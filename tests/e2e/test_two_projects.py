"""Two projects, one mesh (issue 16): VMs labelled mesh=join in the host project and in a second VM
project join the same mesh through one deployment; a VM in a third project that the deployment does not
list (Terraform's vm_projects, MESHJOIN_VM_PROJECTS) is never touched; the sweep lists both projects.

One sandbox holding three projects: meshjoin-sandbox (host), meshjoin-sandbox-2 (managed: its own Log
Router sink and the functions' Compute role, from deploy/terraform) and meshjoin-sandbox-3 (held by the
sandbox, not managed). Everything goes through the real CLIs (meshjoin, gcloud, kubectl)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from meshjoin_sandbox.client import status_of

from .conftest import running_sandbox, verify_vm_identity, wait_for

HOST, SECOND, THIRD = "meshjoin-sandbox", "meshjoin-sandbox-2", "meshjoin-sandbox-3"
# Each VM runs as its own account, of its own project, bound to its own identity (apps/<name>).
VMS = {"tp-host": HOST, "tp-second": SECOND, "tp-third": THIRD}


def account(name: str) -> str:
    return f"{name}@{VMS[name]}.iam.gserviceaccount.com"


BINDINGS = [{"gsa": account(n), "namespace": "apps", "serviceAccount": n, "apps": [n]} for n in VMS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    up_args = ("--project", f"{THIRD}=345678901234", "--terraform-var", f'vm_projects=["{SECOND}"]')
    with running_sandbox(tmp_path_factory.mktemp("two-projects"), bindings=BINDINGS, up_args=up_args) as sandbox:
        yield sandbox


def in_project(name: str) -> list[str]:
    return ["--project", VMS[name]]


def instance(world, name: str) -> dict:
    """instances.get as the operator, over REST (polled: a CLI process per poll would cost seconds)."""
    url = (f"http://127.0.0.1:{world.config['ports']['compute']}/compute/v1/projects/{VMS[name]}/zones/"
           f"us-central1-a/instances/{name}")
    answer = requests.get(url, headers={"Authorization": f"Bearer {world.config['admin_token']}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()


def status(world, name: str) -> dict:
    return status_of(instance(world, name))


def joined(world, name: str) -> dict:
    """meshjoin delivers, the VM's own agent (its startup script) hands in its key and confirms."""
    wait_for(lambda: status(world, name).get("state") in ("waiting", "joined"), timeout=30, what=f"{name} delivered")
    if status(world, name).get("state") == "waiting":  # labelled at creation: its boot ran before the bootstrap
        world.meshjoin("sandbox", "run-startup", name, *in_project(name))
    return wait_for(lambda: (s := status(world, name)).get("state") == "joined" and s, timeout=30,
                    what=f"{name} joined")


def each(fn, names):
    """fn(name) for every name at once (each mostly waits on the sandbox), answers in order."""
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(fn, names)))


def test_vms_of_two_projects_join_one_mesh_and_a_third_projects_vm_is_left_alone(world):
    assert world.env_vars["MESHJOIN_VM_PROJECTS"] == f"{HOST},{SECOND}"  # as deploy/terraform sets it
    each(lambda name: world.meshjoin("sandbox", "create-vm", name, *in_project(name), "--label", "mesh=join",
                                     "--service-account", account(name)), list(VMS))
    # Real gcloud, as the operator, in the second project of the same sandbox.
    listed = json.loads(world.run("gcloud", "compute", "instances", "list", "--project", SECOND,
                                  "--format=json").stdout)
    assert [vm["name"] for vm in listed] == ["tp-second"]

    statuses = each(lambda name: joined(world, name), ["tp-host", "tp-second"])
    root = world.ca_file("root-cert.pem").read_text()
    roots = each(lambda name: world.meshjoin("sandbox", "vm-root", name, *in_project(name)).stdout.strip(),
                 list(statuses))
    for name, state in statuses.items():
        project = VMS[name]
        assert state["workloadEntry"] == f"apps/{name}-us-central1-a-{project}", "names carry the project"
        certs = {f: (Path(roots[name]) / "etc" / "certs" / f).read_text() for f in ("key.pem", "cert-chain.pem")}
        verify_vm_identity(certs, f"spiffe://cluster.local/ns/apps/sa/{name}", root)
    assert roots["tp-second"].startswith(str(world.state_dir / "projects" / SECOND / "vms")), "its own guest"
    entries = {e["metadata"]["name"]: e for e in world.entries()}
    assert set(entries) == {"tp-host-us-central1-a-meshjoin-sandbox", "tp-second-us-central1-a-meshjoin-sandbox-2"}
    for name, entry in entries.items():
        annotations = entry["metadata"]["annotations"]
        assert annotations["meshjoin.dev/project"] == VMS[annotations["meshjoin.dev/instance"]]
        assert entry["spec"]["serviceAccount"] == annotations["meshjoin.dev/instance"]

    # The third project has no sink in the deployment (no event arrives), and a message naming its VM is
    # refused by the events function before any call: nothing is ever written to that VM.
    world.publish({"project": THIRD, "zone": "us-central1-a", "instance": "tp-third"})
    wait_for(lambda: [e for e in world.function_log() if e.get("outcome") == "rejected" and
                      "not among MESHJOIN_VM_PROJECTS" in e.get("message", "")], what="the refusal logged")
    third = instance(world, "tp-third")
    assert third["name"] == "tp-third" and third["labels"] == {"mesh": "join"}
    assert not [i["key"] for i in third.get("metadata", {}).get("items", []) if i["key"].startswith("meshjoin")]
    assert not [e for e in world.function_log() if e.get("project") == THIRD and e.get("outcome") != "rejected"]

    # The sweep lists both projects: both joined VMs are healthy, the third project's VM is not seen.
    rows = {r["name"]: r for r in json.loads(world.meshjoin("status", "--json").stdout)}
    assert {n: (r["project"], r["state"]) for n, r in rows.items()} == {"tp-host": (HOST, "joined"),
                                                                        "tp-second": (SECOND, "joined")}
    # The second project's listing fails once (its own Compute: `fault --emulator compute@PROJECT`): that
    # sweep leaves that project's VMs and entries alone and says so (nothing planned, nothing pruned).
    world.meshjoin("sandbox", "fault", "--emulator", f"compute@{SECOND}", "--method", "instances.aggregatedList",
                   "--status", "403", "--count", "1")
    dry = json.loads(world.meshjoin("reconcile", "--dry-run", "--json").stdout)
    assert dry["planned"] == [] and [e.split(":")[0] for e in dry["errors"]] == [f"Compute instances in {SECOND}"]
    assert any("VM listing incomplete" in note and SECOND in note for note in dry["notes"])
    # A lost delete in the second project: the sweep's listing of that project shows the VM gone, and only
    # its entry is pruned.
    world.meshjoin("sandbox", "delete-vm", "tp-second", *in_project("tp-second"), "--no-event")
    swept = json.loads(world.meshjoin("reconcile", "--json").stdout)
    assert swept["planned"] == [f"prune {SECOND}/us-central1-a/tp-second: no labelled VM by that name "
                                "(404 or label removed)"], swept
    # The sweep publishes the prune; the events function does it (issue 16), from its own 404.
    assert swept["errors"] == [] and swept["published_prune"] == 1 and swept["published"] == 1, swept
    wait_for(lambda: [e["metadata"]["name"] for e in world.entries()] == ["tp-host-us-central1-a-meshjoin-sandbox"],
             timeout=60, what="the second project's lost VM's entry pruned by the events function")
