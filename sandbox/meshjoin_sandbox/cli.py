"""`meshjoin sandbox ...`: start/stop the local world and act in it as a person (or a test) would.

Plugged into the `meshjoin` CLI through the `meshjoin.cli` entry point. The VM verbs go through the
real google-cloud-compute client against the Compute emulator, so they exercise the same wire format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from . import launcher
from .config import SandboxConfig

STATE_DIR_OPTION = click.option(
    "--state-dir", type=click.Path(path_type=Path), show_default=True,
    default=lambda: os.environ.get("MESHJOIN_SANDBOX_DIR", ".sandbox"),
    help="Directory holding the sandbox's state, logs and env file.",
)


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{what} must be KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


PROJECT_OPTION = click.option("--project", help="The sandbox project of the VM (default: the host project; "
                                                "see `sandbox.json` projects, e.g. meshjoin-sandbox-2).")


class SandboxClients:
    """Real Google clients pointed at one sandbox, authenticated with its operator token, acting in
    one of its projects (default: the host project)."""

    def __init__(self, state_dir: Path, project: str | None = None):
        self.cfg = SandboxConfig.load(state_dir)
        self.project = project or self.cfg.project
        if self.project not in self.cfg.projects:
            raise click.ClickException(f"the sandbox holds no project {self.project!r}: "
                                       f"one of {', '.join(self.cfg.projects)}")

    def _credentials(self):
        from google.oauth2.credentials import Credentials

        return Credentials(self.cfg.admin_token)

    def compute(self):
        from google.cloud import compute_v1

        opts = {"api_endpoint": self.cfg.url("compute")}
        return (compute_v1.InstancesClient(transport="rest", client_options=opts, credentials=self._credentials()),
                compute_v1.ZoneOperationsClient(transport="rest", client_options=opts,
                                                credentials=self._credentials()))

    def wait(self, ops, operation, zone: str) -> None:
        result = ops.wait(project=self.project, zone=zone, operation=operation.name)
        if result.error and result.error.errors:
            raise click.ClickException(f"operation failed: {result.error.errors[0].message}")

    def metadata(self, no_event: bool):
        return [("x-sandbox-no-event", "1")] if no_event else []

    def get_json(self, path: str) -> dict:
        from google.auth.transport.requests import AuthorizedSession

        session = AuthorizedSession(self._credentials())
        response = session.get(self.cfg.url("compute") + path)
        if response.status_code == 404:
            raise click.ClickException(f"not found: {path}")
        response.raise_for_status()
        return response.json()


@click.group()
def sandbox():
    """The local sandbox: Pub/Sub emulator, the functions, and emulators of Compute, Secret Manager,
    GKE, the Kubernetes API and the metadata server, all on loopback."""


@sandbox.command()
@STATE_DIR_OPTION
@click.option("--ca-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Istio plug-in CA directory (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem) "
                   "to seed Secret Manager with; default: a fresh two-level CA.")
@click.option("--function-env", multiple=True, metavar="KEY=VALUE",
              help="Extra setting for both functions (e.g. MESHJOIN_CERT_TTL=2m).")
@click.option("--terraform-var", "terraform_vars", multiple=True, metavar="NAME=VALUE",
              help="deploy/terraform variable the sandbox's IAM and RBAC are evaluated with; VALUE is JSON "
                   "(or a plain string), e.g. 'name=\"meshjoin\"'.")
@click.option("--project", "projects", multiple=True, metavar="ID=NUMBER",
              help="A further project for the sandbox to hold (beside meshjoin-sandbox and meshjoin-sandbox-2); "
                   "meshjoin manages those Terraform's vm_projects names (--terraform-var 'vm_projects=[...]').")
def up(state_dir: Path, ca_dir: Path | None, function_env: tuple[str, ...], terraform_vars: tuple[str, ...],
       projects: tuple[str, ...]):
    """Start the sandbox in the background; return when everything answers."""
    from .config import DEFAULT_PROJECTS

    variables = {}
    for name, value in parse_pairs(terraform_vars, "--terraform-var").items():
        try:
            variables[name] = json.loads(value)
        except ValueError:
            variables[name] = value
    try:
        cfg = launcher.up(state_dir, ca_dir, parse_pairs(function_env, "--function-env"),
                          terraform_vars=variables,
                          projects={**DEFAULT_PROJECTS, **parse_pairs(projects, "--project")})
    except launcher.SandboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"sandbox up in {cfg.state_dir}; use it with: source {cfg.state_dir}/env")


@sandbox.command()
@STATE_DIR_OPTION
def down(state_dir: Path):
    """Stop every process the sandbox started (by process group)."""
    names = launcher.down(state_dir)
    click.echo(f"sandbox down ({', '.join(names) or 'nothing was running'})")


@sandbox.command("create-vm")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone", help="Zone (default: the sandbox's zone).")
@PROJECT_OPTION
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--metadata", "metadata", multiple=True, metavar="K=V")
@click.option("--service-account", help="VM service account (default: the project's default compute SA).")
@click.option("--no-event", is_flag=True, help="Publish no audit entry (a lost event).")
def create_vm(name, state_dir, zone, project, labels, metadata, service_account, no_event):
    """Create a VM through the Compute API."""
    from google.cloud import compute_v1

    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    items = [compute_v1.Items(key=k, value=v) for k, v in parse_pairs(metadata, "--metadata").items()]
    body = compute_v1.Instance(
        name=name,
        machine_type=f"zones/{zone}/machineTypes/e2-small",
        labels=parse_pairs(labels, "--label"),
        metadata=compute_v1.Metadata(items=items),
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
    )
    if service_account:
        body.service_accounts = [compute_v1.ServiceAccount(
            email=service_account, scopes=["https://www.googleapis.com/auth/cloud-platform"])]
    op = instances.insert_unary(project=clients.project, zone=zone, instance_resource=body,
                                metadata=clients.metadata(no_event))
    clients.wait(ops, op, zone)
    click.echo(f"created {zone}/{name}")


def copy_disk(source_root: Path, new_root: Path) -> None:
    """A disk clone: NEW's fake root becomes a copy of SOURCE's, every file with its mode (and owner when
    the sandbox runs as root, as a disk keeps owners). Whatever was at NEW's root before is gone, as a
    fresh disk would have none of it."""
    import shutil

    if new_root.exists():
        shutil.rmtree(new_root)
    shutil.copytree(source_root, new_root, symlinks=True)
    if os.geteuid() == 0:
        for path in [source_root, *source_root.rglob("*")]:
            stat = path.lstat()
            os.lchown(new_root / path.relative_to(source_root), stat.st_uid, stat.st_gid)


def clone_vm(state_dir: Path, source: str, new: str, zone: str | None = None, with_disk: bool = False,
             service_account: str | None = None, project: str | None = None) -> dict:
    """Create NEW as a machine image of SOURCE would (GCE: a machine image keeps the instance's
    properties: metadata, labels, service account and scopes, machine type, network; and its disks).

    Through the public instances.insert, as the operator, so NEW's creation is audited like any other
    insert. With `with_disk`, SOURCE's fake root (guest.Guests.root: STATE_DIR/vms/ZONE/NAME/root) is
    copied into NEW's before NEW exists, so its first boot already sees the copied files, as a VM booted
    from a cloned disk does. `service_account` replaces the image's account (insert checks actAs).
    """
    from types import SimpleNamespace

    from google.api_core import exceptions
    from google.cloud import compute_v1

    from .guest import Guests

    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    try:
        original = instances.get(project=clients.project, zone=zone, instance=source)
    except exceptions.NotFound as exc:
        raise click.ClickException(f"no VM {zone}/{source} to clone") from exc
    try:
        instances.get(project=clients.project, zone=zone, instance=new)
        raise click.ClickException(f"VM {zone}/{new} already exists")
    except exceptions.NotFound:
        pass
    accounts = [compute_v1.ServiceAccount(email=a.email, scopes=list(a.scopes)) for a in original.service_accounts]
    if service_account:
        scopes = list(original.service_accounts[0].scopes) if original.service_accounts else \
            ["https://www.googleapis.com/auth/cloud-platform"]
        accounts = [compute_v1.ServiceAccount(email=service_account, scopes=scopes)]
    nic = original.network_interfaces[0] if original.network_interfaces else None
    body = compute_v1.Instance(
        name=new,
        machine_type=f"zones/{zone}/machineTypes/{original.machine_type.rsplit('/', 1)[-1]}",
        labels=dict(original.labels),
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key=i.key, value=i.value)
                                            for i in original.metadata.items]),
        network_interfaces=[compute_v1.NetworkInterface(network=nic.network if nic else "global/networks/default")],
        service_accounts=accounts,
    )
    if with_disk:
        # Guests.root only lays out directories; the running sandbox's Guests uses the same base directory.
        guests = Guests(SimpleNamespace(emulators={}), clients.cfg.vms_dir(clients.project))
        copy_disk(guests.root(zone, source), guests.vm_dir(zone, new) / "root")
    op = instances.insert_unary(project=clients.project, zone=zone, instance_resource=body)
    clients.wait(ops, op, zone)
    return {"zone": zone, "name": new, "source": source, "disk": with_disk,
            "serviceAccount": accounts[0].email if accounts else None}


@sandbox.command("clone")
@click.argument("source")
@click.argument("new")
@STATE_DIR_OPTION
@click.option("--zone", help="Zone of both VMs (default: the sandbox's zone).")
@PROJECT_OPTION
@click.option("--with-disk", is_flag=True, help="Copy SOURCE's disk (its fake root) too, before NEW boots.")
@click.option("--service-account", help="Run NEW as this account instead of SOURCE's (needs actAs on it).")
def clone(source, new, state_dir, zone, project, with_disk, service_account):
    """Create NEW from SOURCE as a machine image would: every metadata item (meshjoin's status and
    certificate chain included), labels, service account; with --with-disk, SOURCE's files too."""
    result = clone_vm(state_dir, source, new, zone, with_disk, service_account, project)
    click.echo(f"cloned {result['zone']}/{source} to {result['zone']}/{new}"
               + (" with its disk" if with_disk else "") + f" (service account {result['serviceAccount']})")


@sandbox.command("set-service-account")
@click.argument("name")
@click.argument("email")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
@click.option("--scope", "scopes", multiple=True, help="OAuth scope (repeatable; default: cloud-platform).")
def set_service_account(name, email, state_dir, zone, project, scopes):
    """instances.setServiceAccount on a stopped VM (GCE refuses a running one; `stop` it first)."""
    from google.api_core import exceptions
    from google.cloud import compute_v1

    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    full = [s if "://" in s else f"https://www.googleapis.com/auth/{s}" for s in scopes] or \
        ["https://www.googleapis.com/auth/cloud-platform"]
    request = compute_v1.InstancesSetServiceAccountRequest(email=email, scopes=full)
    try:
        op = instances.set_service_account_unary(project=clients.project, zone=zone, instance=name,
                                                 instances_set_service_account_request_resource=request)
    except exceptions.GoogleAPICallError as exc:
        raise click.ClickException(f"setServiceAccount {zone}/{name}: {exc.message}") from exc
    clients.wait(ops, op, zone)
    click.echo(f"{zone}/{name} now runs as {email}")


@sandbox.command("delete-vm")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
@click.option("--no-event", is_flag=True, help="Publish no audit entry (a lost event).")
def delete_vm(name, state_dir, zone, project, no_event):
    """Delete a VM through the Compute API."""
    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    op = instances.delete_unary(project=clients.project, zone=zone, instance=name,
                                metadata=clients.metadata(no_event))
    clients.wait(ops, op, zone)
    click.echo(f"deleted {zone}/{name}")


@sandbox.command("set-labels")
@click.argument("name")
@click.argument("labels", nargs=-1, metavar="K=V...")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Label key to remove.")
@click.option("--no-event", is_flag=True, help="Publish no audit entry (a lost event).")
def set_labels(name, labels, state_dir, zone, project, remove, no_event):
    """Merge labels into a VM's labels (setLabels with the current fingerprint)."""
    from google.cloud import compute_v1

    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    current = instances.get(project=clients.project, zone=zone, instance=name)
    merged = {**dict(current.labels), **parse_pairs(labels, "label")}
    for key in remove:
        merged.pop(key, None)
    request = compute_v1.InstancesSetLabelsRequest(labels=merged, label_fingerprint=current.label_fingerprint)
    op = instances.set_labels_unary(project=clients.project, zone=zone, instance=name,
                                    instances_set_labels_request_resource=request,
                                    metadata=clients.metadata(no_event))
    clients.wait(ops, op, zone)
    click.echo(f"labels of {zone}/{name}: {json.dumps(merged, sort_keys=True)}")


@sandbox.command()
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
@click.option("--json", "as_json", is_flag=True, help="The instance as the Compute API returns it.")
def vm(name, state_dir, zone, project, as_json):
    """Show a VM (its labels, address and meshjoin metadata)."""
    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    body = clients.get_json(f"/compute/v1/projects/{clients.project}/zones/{zone}/instances/{name}")
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    items = {i["key"]: i.get("value", "") for i in body.get("metadata", {}).get("items", [])}
    click.echo(f"{zone}/{name} id={body['id']} ip={body['networkInterfaces'][0]['networkIP']}")
    click.echo(f"labels: {json.dumps(body.get('labels', {}), sort_keys=True)}")
    if "meshjoin-status" in items:
        click.echo(f"meshjoin-status: {items['meshjoin-status']}")


@sandbox.command("access-secret")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--version", default="latest", show_default=True)
def access_secret(name, state_dir, version):
    """Print the payload of a secret version (the sandbox's Secret Manager)."""
    from google.cloud import secretmanager_v1

    clients = SandboxClients(state_dir)  # secrets live in the host project
    client = secretmanager_v1.SecretManagerServiceClient(
        transport="rest", credentials=clients._credentials(),
        client_options={"api_endpoint": clients.cfg.url("secretmanager")})
    if not name.startswith("projects/"):
        name = f"projects/{clients.cfg.project}/secrets/{name}/versions/{version}"
    click.echo(client.access_secret_version(name=name).payload.data.decode())


@sandbox.command()
@STATE_DIR_OPTION
def tick(state_dir):
    """Publish what Cloud Scheduler publishes to the schedule topic (one maintenance sweep)."""
    cfg = SandboxConfig.load(state_dir)
    publisher, _ = launcher.pubsub_clients(cfg)
    payload = json.dumps({"source": "cloud-scheduler", "job": "meshjoin-sweep"}).encode()
    message_id = publisher.publish(publisher.topic_path(cfg.project, cfg.schedule_topic), payload).result()
    click.echo(f"published tick {message_id}")


def _emulator_name(value: str | None) -> str | None:
    if value is None or value in ("compute", "secretmanager", "kube") or value.startswith("compute@"):
        return value
    raise click.BadParameter(f"{value!r}: one of compute, secretmanager, kube, compute@PROJECT")


def control(state_dir: Path, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
    """Call the sandbox's own control plane (not a Google API)."""
    import urllib.request

    cfg = SandboxConfig.load(state_dir)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(cfg.url("control") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


@sandbox.command()
@STATE_DIR_OPTION
@click.option("--emulator", callback=lambda ctx, param, value: _emulator_name(value),
              help="compute, secretmanager or kube; compute@PROJECT for another sandbox project's Compute.")
@click.option("--method", help="API method or fnmatch pattern: instances.aggregatedList, secrets.versions.*, "
                               "workloadentries.create (kube: PLURAL.VERB), * for all.")
@click.option("--kind", type=click.Choice(["error", "latency", "timeout", "drop", "partial"]), default="error",
              show_default=True, help="error: answer STATUS; latency: wait SECONDS then serve; timeout: wait SECONDS "
                                      "then 504, nothing applied; drop: apply, then lose the answer (see --after); "
                                      "partial: a listing leaves a zone out.")
@click.option("--status", default=503, show_default=True)
@click.option("--count", type=int, help="Fire for the next COUNT matching calls [default: 1, or unlimited "
                                        "with --probability].")
@click.option("--probability", type=float, help="Fire for this fraction of matching calls.")
@click.option("--seconds", type=float, default=0.0, help="latency/timeout: how long to wait.")
@click.option("--after", type=click.Choice(["status", "close", "timeout"]), default="status", show_default=True,
              help="drop: answer STATUS, reset the connection, or wait SECONDS and answer 504.")
@click.option("--product-only", is_flag=True, help="Only calls made with the functions' own token (not yours).")
@click.option("--clear", is_flag=True, help="Forget every pending injected failure.")
@click.option("--show", is_flag=True, help="Print each emulator's rules and counts of calls and injected faults.")
def fault(state_dir, emulator, method, kind, status, count, probability, seconds, after, product_only, clear, show):
    """Inject a fault into an emulated API method (by default: the next call answers 503)."""
    if show:
        click.echo(json.dumps(control(state_dir, "GET", "/faults"), indent=2))
        return
    if clear:
        control(state_dir, "DELETE", "/faults")
        click.echo("pending faults cleared")
        return
    if not emulator or not method:
        raise click.UsageError("--emulator and --method are required (or --clear, --show)")
    spec = {"emulator": emulator, "method": method, "kind": kind, "status": status, "seconds": seconds,
            "after": after, "principal": "product" if product_only else "any"}
    if probability is not None:
        spec["probability"] = probability
    if count is not None or probability is None:
        spec["count"] = 1 if count is None else count
    import urllib.error

    try:
        control(state_dir, "POST", "/faults", spec)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(exc.read().decode(errors="replace")) from exc
    share = f"{probability:.0%} of" if probability is not None else "every"
    click.echo(f"{kind} fault on {emulator} {method}: {share} matching call(s)"
               + (f", at most {spec['count']}" if "count" in spec else ""))


@sandbox.command("restart-function")
@click.argument("name", type=click.Choice([name for name, *_ in launcher.FUNCTIONS]))
@STATE_DIR_OPTION
@click.option("--signal", "sig", type=click.Choice(["KILL", "TERM"]), default="KILL", show_default=True,
              help="KILL: the function dies mid-request, like a crashed instance.")
def restart_function(name, state_dir, sig):
    """Kill a function's processes and start it again (Pub/Sub redelivers what it was handling)."""
    import signal

    try:
        pid = launcher.restart_function(state_dir, name, getattr(signal, f"SIG{sig}"))
    except launcher.SandboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{name} restarted (pid {pid})")


@sandbox.command("vm-metadata")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone", help="Zone (default: the sandbox's zone).")
@PROJECT_OPTION
def vm_metadata(name, state_dir, zone, project):
    """Print HOST:PORT of a metadata server with VM NAME's own view (started on first use): run the
    VM agent with GCE_METADATA_HOST set to it."""
    import urllib.error

    try:
        result = control(state_dir, "POST", "/vm-metadata", {"zone": zone, "name": name, "project": project})
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"no metadata server for {name}: {exc.read().decode(errors='replace')}") from exc
    click.echo(result["host"])


@sandbox.command("rotate-ca")
@STATE_DIR_OPTION
def rotate_ca(state_dir):
    """Rotate the plug-in CA to a new root: new versions of the four CA secrets (old root stays trusted)."""
    result = control(state_dir, "POST", "/rotate-ca")
    click.echo(f"CA rotated; new files in {result['ca_dir']}")


def _power(state_dir: Path, name: str, zone: str | None, verb: str, project: str | None = None) -> str:
    """instances.stop|start|reset through the real client, waiting for the operation (and the VM)."""
    clients = SandboxClients(state_dir, project)
    zone = zone or clients.cfg.zone
    instances, ops = clients.compute()
    method = {"stop": instances.stop_unary, "start": instances.start_unary, "reset": instances.reset_unary}[verb]
    from google.api_core import exceptions

    try:
        op = method(project=clients.project, zone=zone, instance=name)
    except exceptions.GoogleAPICallError as exc:
        raise click.ClickException(f"{verb} {zone}/{name}: {exc.message}") from exc
    clients.wait(ops, op, zone)
    return zone


@sandbox.command()
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
def stop(name, state_dir, zone, project):
    """Stop a VM (instances.stop: STOPPING, then TERMINATED)."""
    zone = _power(state_dir, name, zone, "stop", project)
    click.echo(f"stopped {zone}/{name}")


@sandbox.command()
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
def start(name, state_dir, zone, project):
    """Start a stopped VM (instances.start: PROVISIONING, STAGING, RUNNING; the startup script runs)."""
    zone = _power(state_dir, name, zone, "start", project)
    click.echo(f"started {zone}/{name}")


@sandbox.command()
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
def reboot(name, state_dir, zone, project):
    """Reset a running VM (instances.reset): the guest boots again and runs its startup script."""
    zone = _power(state_dir, name, zone, "reset", project)
    click.echo(f"reset {zone}/{name}")


@sandbox.command("vm-root")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
def vm_root(name, state_dir, zone, project):
    """Print the directory that is VM NAME's fake root (its startup script writes there)."""
    import urllib.error

    try:
        root = control(state_dir, "POST", "/vm-root", {"zone": zone, "name": name, "project": project})["root"]
        click.echo(root)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"no VM {name}: {exc.read().decode(errors='replace')}") from exc


@sandbox.command("run-startup")
@click.argument("name")
@STATE_DIR_OPTION
@click.option("--zone")
@PROJECT_OPTION
def run_startup(name, state_dir, zone, project):
    """Run VM NAME's startup script now, as `sudo google_metadata_script_runner startup` on it would."""
    import urllib.error

    try:
        result = control(state_dir, "POST", "/run-startup", {"zone": zone, "name": name, "project": project},
                         timeout=660)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(exc.read().decode(errors="replace")) from exc
    if not result["ran"]:
        click.echo(f"{name}: no startup-script in instance or project metadata")
        return
    click.echo(f"{name}: startup-script exited {result['returncode']}; output in {result['serial_log']}")
    if result["returncode"] != 0:
        raise SystemExit(1)


@sandbox.command("token")
@click.option("--as", "email", required=True, help="Account email the token speaks for (any account).")
@click.option("--scope", "scopes", multiple=True,
              help="OAuth scope (repeatable; default: cloud-platform). A bare name means "
                   "https://www.googleapis.com/auth/NAME.")
@STATE_DIR_OPTION
def token(email, scopes, state_dir):
    """Print an access token for EMAIL that every emulator accepts; IAM and RBAC then decide what it may do."""
    import urllib.error

    full = [s if "://" in s else f"https://www.googleapis.com/auth/{s}" for s in scopes]
    try:
        result = control(state_dir, "POST", "/token", {"email": email, "scopes": full or None})
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"no token for {email}: {exc.read().decode(errors='replace')}") from exc
    click.echo(result["token"])
