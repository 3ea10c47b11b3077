"""`sandbox up` / `sandbox down`: start the local world in the background and stop all of it.

Every process is started in its own session (so its process group id = its pid) and recorded in
STATE_DIR/pids.json; `down` signals each group, so children (the Java behind the Pub/Sub emulator,
gunicorn workers behind functions-framework) go too.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import PORT_NAMES, SandboxConfig
from .crds import istio_crds_path
from .kube_rbac import apply_terraform_rbac
from .project_metadata import apply_project_metadata_items

REPO = Path(__file__).resolve().parents[2]
PUBSUB_EMULATOR = "platform/pubsub-emulator/bin/cloud-pubsub-emulator"
CA_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
# The functions: (port name, source dir, target, subscription suffix, topic attribute).
FUNCTIONS = (
    ("events_fn", "events", "on_vm_event", "events"),
    ("maintenance_fn", "maintenance", "on_schedule", "schedule"),
)


class SandboxError(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pubsub_emulator_path() -> Path:
    gcloud = shutil.which("gcloud")
    candidates = [Path("/usr/lib/google-cloud-sdk") / PUBSUB_EMULATOR]
    if gcloud:
        candidates.append(Path(os.path.realpath(gcloud)).parents[1] / PUBSUB_EMULATOR)
    for path in candidates:
        if path.exists():
            return path
    raise SandboxError("the Pub/Sub emulator is not installed: apt-get install google-cloud-cli-pubsub-emulator")


def wait_for_port(port: int, what: str, deadline: float, proc: subprocess.Popen, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SandboxError(f"{what} exited with {proc.returncode}; its log: {log}\n{tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SandboxError(f"{what} did not answer on port {port} in time; its log: {log}\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# Settings of the functions that agent.tf also renders into the VM projects' metadata, and their variables.
VM_SETTING_VARIABLES = {"MESHJOIN_ISTIOD_ADDRESS": "istiod_address", "MESHJOIN_ISTIOD_IP": "istiod_ip",
                        "MESHJOIN_MESH_ID": "mesh_id", "MESHJOIN_KEY_ALGORITHM": "key_algorithm",
                        "MESHJOIN_SIDECAR_URL": "sidecar_url", "MESHJOIN_SIDECAR_SHA256": "sidecar_sha256",
                        "MESHJOIN_NETWORK": "network", "MESHJOIN_CLUSTER_ID": "cluster_id",
                        "MESHJOIN_TRUST_DOMAIN": "trust_domain"}


def product_env(cfg: SandboxConfig) -> dict[str, str]:
    """The settings the product reads, pointed at the sandbox (also what DIR/env exports)."""
    return {
        "MESHJOIN_PROJECT": cfg.project,
        "MESHJOIN_CLUSTER": cfg.cluster_path,
        "MESHJOIN_COMPUTE_ENDPOINT": cfg.url("compute"),
        "MESHJOIN_SECRETMANAGER_ENDPOINT": cfg.url("secretmanager"),
        "MESHJOIN_CONTAINER_ENDPOINT": cfg.url("container"),
        "MESHJOIN_CA_CERT_SECRET": cfg.ca_secrets[0],
        "MESHJOIN_CA_KEY_SECRET": cfg.ca_secrets[1],
        "MESHJOIN_CA_CHAIN_SECRET": cfg.ca_secrets[2],
        "MESHJOIN_CA_ROOT_SECRET": cfg.ca_secrets[3],
        "MESHJOIN_EVENTS_TOPIC": cfg.events_topic,
        "MESHJOIN_PUBSUB_ENDPOINT": cfg.url("pubsub"),  # where a VM's agent publishes its nudge
        "MESHJOIN_SCHEDULE_TOPIC": cfg.schedule_topic,
        # As deploy/terraform sets it (main.tf, function_settings), from the same variable.
        "MESHJOIN_IDENTITY_BINDINGS": json.dumps(cfg.terraform_vars["identity_bindings"]),
        # As main.tf sets it from var.vm_projects (unset while meshjoin manages the host alone).
        **({"MESHJOIN_VM_PROJECTS": ",".join(cfg.vm_projects)} if len(cfg.vm_projects) > 1 else {}),
        # As main.tf sets them, from the variables agent.tf renders the VMs' project metadata from.
        "MESHJOIN_ISTIOD_ADDRESS": cfg.terraform_vars["istiod_address"],
        "MESHJOIN_ISTIOD_IP": cfg.terraform_vars["istiod_ip"],
        "GCE_METADATA_HOST": f"127.0.0.1:{cfg.ports['metadata']}",
        "GCE_METADATA_IP": f"127.0.0.1:{cfg.ports['metadata']}",
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{cfg.ports['pubsub']}",
        **cfg.function_env,
    }


def tool_env(cfg: SandboxConfig) -> dict[str, str]:
    """What a person needs for real gcloud and kubectl against the sandbox."""
    state = Path(cfg.state_dir)
    return {
        "CLOUDSDK_CORE_PROJECT": cfg.project,
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": cfg.url("pubsub") + "/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": cfg.url("compute") + "/compute/v1/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER": cfg.url("secretmanager") + "/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER": cfg.url("container") + "/",
        # gcloud speaks as the operator (project owner): the access-token file is gcloud's own way
        # to use a token it did not mint (auth/access_token_file); the emulators refuse calls without one.
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(operator_token_file(cfg)),
        "CLOUDSDK_CONFIG": str(state / "gcloud"),
        "MESHJOIN_SANDBOX_FUNCTIONS_SA": cfg.service_account,
        "KUBECONFIG": str(state / "kubeconfig"),
        "MESHJOIN_SANDBOX_DIR": str(state),
    }


def operator_token_file(cfg: SandboxConfig) -> Path:
    return Path(cfg.state_dir) / "operator-token"


def write_env_file(cfg: SandboxConfig) -> Path:
    token_file = operator_token_file(cfg)
    token_file.touch(mode=0o600)
    token_file.write_text(cfg.admin_token)
    env = {**tool_env(cfg), **product_env(cfg)}
    path = Path(cfg.state_dir) / "env"
    lines = ["# meshjoin sandbox: `source` this file to point gcloud, kubectl and meshjoin at it"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file written by `write_env_file` (what `source DIR/env` would set)."""
    env = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


def json_lines(text: str) -> list[dict]:
    """The JSON-object lines of a function log (the functions also print plain lines)."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def write_kubeconfig(cfg: SandboxConfig) -> None:
    import base64

    ca = base64.b64encode(Path(cfg.kube_ca_file).read_bytes()).decode()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {
            "server": f"https://127.0.0.1:{cfg.ports['kube']}", "certificate-authority-data": ca}}],
        "users": [{"name": "operator", "user": {"token": cfg.admin_token}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "operator"}}],
        "current-context": "sandbox",
    }
    path = Path(cfg.state_dir) / "kubeconfig"
    path.write_text(json.dumps(kubeconfig, indent=2))
    path.chmod(0o600)


class Processes:
    """The processes of one sandbox, recorded in STATE_DIR/pids.json as they start."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "pids.json"
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, int] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None):
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )
        self.pids[name] = proc.pid
        self.path.write_text(json.dumps(self.pids))
        return proc, log

    def alive(self) -> dict[str, int]:
        return {name: pid for name, pid in self.pids.items() if group_alive(pid)}

    def stop_all(self, grace: float = 5.0) -> None:
        for pid in self.pids.values():
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.alive().values():
            signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.path.unlink(missing_ok=True)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies of ours are reaped first)."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(state_dir: Path, ca_dir: Path | None = None, function_env: dict[str, str] | None = None,
       timeout: float = 60.0, compute_subnet: str | None = None,
       terraform_vars: dict | None = None, run_startup_scripts: bool = True,
       projects: dict[str, str] | None = None) -> SandboxConfig:
    """Start the sandbox; `terraform_vars` override the sandbox's Terraform variables (IAM, RBAC and
    the functions' identity bindings follow them), e.g. {"identity_bindings": [...]}.
    `run_startup_scripts=False`: VMs boot without running their startup script (benchmarks, which play
    each VM's agent themselves; see SandboxConfig.run_startup_scripts)."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    procs = Processes(state_dir)
    if procs.alive():
        raise SandboxError(f"a sandbox is already running in {state_dir}: `meshjoin sandbox down` first")
    procs.pids = {}
    from .ca import make_plugin_ca, make_tls_ca_and_server

    plugin_ca = state_dir / "ca"
    plugin_ca.mkdir(exist_ok=True)
    if ca_dir is not None:
        for filename in CA_FILES:
            shutil.copyfile(Path(ca_dir) / filename, plugin_ca / filename)
    else:
        make_plugin_ca(plugin_ca)
    kube_ca, kube_cert, kube_key = make_tls_ca_and_server(state_dir / "kube-tls")
    cfg = SandboxConfig(
        state_dir=str(state_dir),
        ports=dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)))),
        sa_token="ya29.sandbox-sa-" + secrets.token_hex(12),
        admin_token="ya29.sandbox-admin-" + secrets.token_hex(12),
        ca_dir=str(plugin_ca),
        kube_ca_file=str(kube_ca),
        kube_cert_file=str(kube_cert),
        kube_key_file=str(kube_key),
        crd_path=str(istio_crds_path()),
        function_env=dict(function_env or {}),
        run_startup_scripts=run_startup_scripts,
    )
    if compute_subnet:
        cfg.compute_subnet = compute_subnet
    if projects:  # the sandbox's projects (id -> number), host first, e.g. a third one a test keeps unmanaged
        cfg.projects = {cfg.project: cfg.project_number, **{p: n for p, n in projects.items() if p != cfg.project}}
    terraform_vars = dict(terraform_vars or {})
    if "MESHJOIN_IDENTITY_BINDINGS" in cfg.function_env:
        # The functions' bindings and Terraform's (actAs, writer RBAC) are one list, as in a deployment.
        try:
            terraform_vars.setdefault("identity_bindings", json.loads(cfg.function_env["MESHJOIN_IDENTITY_BINDINGS"]))
        except ValueError as exc:
            raise SandboxError(f"MESHJOIN_IDENTITY_BINDINGS is not JSON: {exc}") from exc
    # What every VM shares is in project metadata (agent.tf), rendered from Terraform variables: settings given
    # to the functions become those variables, so both sides say the same, as in a deployment.
    for setting, variable in VM_SETTING_VARIABLES.items():
        if cfg.function_env.get(setting):
            terraform_vars.setdefault(variable, cfg.function_env[setting])
    # The VMs' agents publish their nudge to the sandbox's Pub/Sub emulator.
    terraform_vars.setdefault("pubsub_endpoint", cfg.url("pubsub"))
    from .quota import time_factor_from_env

    try:
        cfg.time_factor = time_factor_from_env(os.environ)
    except ValueError as exc:
        raise SandboxError(str(exc)) from None
    if terraform_vars:
        from .terraform import TerraformError, default_terraform_dir, load_terraform

        cfg.terraform_vars = {**cfg.terraform_vars, **terraform_vars}
        try:  # an undeclared variable fails here, not in the world process
            load_terraform(default_terraform_dir(), cfg.terraform_vars, project_number=cfg.project_number)
        except TerraformError as exc:
            raise SandboxError(f"terraform variables: {exc}") from exc
    cfg.save()
    (state_dir / "world-ready").unlink(missing_ok=True)
    shutil.rmtree(state_dir / "vms", ignore_errors=True)  # a new world has no VMs: no stale guest roots
    shutil.rmtree(state_dir / "projects", ignore_errors=True)  # nor in its other projects (cfg.vms_dir)
    (state_dir / "gcloud").mkdir(exist_ok=True)
    write_kubeconfig(cfg)
    write_env_file(cfg)
    deadline = time.monotonic() + timeout
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHJOIN_", "GCE_METADATA"))}
    try:
        proc, log = procs.start(
            "pubsub", [str(pubsub_emulator_path()), "--host=127.0.0.1", f"--port={cfg.ports['pubsub']}"], base_env)
        wait_for_port(cfg.ports["pubsub"], "the Pub/Sub emulator", deadline, proc, log)
        create_topics(cfg)
        proc, log = procs.start("world", [sys.executable, "-m", "meshjoin_sandbox.server", str(state_dir)], base_env)
        while not (state_dir / "world-ready").exists():
            wait_for_port(cfg.ports["control"], "the emulators", deadline, proc, log)
            if time.monotonic() > deadline:
                raise SandboxError(f"the emulators did not become ready; log {log}\n{tail(log)}")
            time.sleep(0.05)
        create_app_namespaces(cfg)
        apply_terraform_rbac(cfg)  # kubernetes.tf's Roles and bindings, as `terraform apply` creates them
        apply_project_metadata_items(cfg)  # agent.tf: the VM agent in each VM project's metadata
        for port_name, *_ in FUNCTIONS:
            start_function(cfg, procs, port_name, base_env, deadline)
        create_push_subscriptions(cfg)
    except BaseException:
        procs.stop_all()
        raise
    return cfg


def start_function(cfg: SandboxConfig, procs: Processes, port_name: str, base_env: dict[str, str],
                   deadline: float) -> int:
    """Start one function under functions-framework (its own process group) and wait for its port."""
    source, target = next((src, tgt) for name, src, tgt, _ in FUNCTIONS if name == port_name)
    fn_env = {**base_env, **product_env(cfg), "PYTHONUNBUFFERED": "1"}
    proc, log = procs.start(port_name, [
        str(Path(sys.executable).with_name("functions-framework")),
        "--source", str(REPO / "functions" / source / "main.py"), "--target", target,
        "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(cfg.ports[port_name]),
    ], fn_env, cwd=REPO / "functions" / source)
    wait_for_port(cfg.ports[port_name], f"the {source} function", deadline, proc, log)
    return proc.pid


def restart_function(state_dir: Path, port_name: str, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
    """Kill one function's process group with `sig` (SIGKILL: it dies mid-request, as a crashed or
    scaled-in instance does) and start it again on the same port; answers the new pid."""
    if port_name not in {name for name, *_ in FUNCTIONS}:
        raise SandboxError(f"no function named {port_name!r}; one of {', '.join(n for n, *_ in FUNCTIONS)}")
    state_dir = state_dir.resolve()
    cfg = SandboxConfig.load(state_dir)
    procs = Processes(state_dir)
    old = procs.pids.get(port_name)
    deadline = time.monotonic() + timeout
    if old is not None:
        signal_group(old, sig)
        while group_alive(old) and time.monotonic() < deadline:
            time.sleep(0.02)
        if group_alive(old):
            raise SandboxError(f"the {port_name} process group {old} did not stop")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHJOIN_", "GCE_METADATA"))}
    return start_function(cfg, procs, port_name, base_env, deadline)


def create_app_namespaces(cfg: SandboxConfig) -> None:
    """The namespaces an operator would have made for VM workloads (meshjoin never creates namespaces)."""
    import requests

    for namespace in cfg.app_namespaces:
        response = requests.post(
            f"https://127.0.0.1:{cfg.ports['kube']}/api/v1/namespaces", verify=cfg.kube_ca_file, timeout=10,
            headers={"Authorization": f"Bearer {cfg.admin_token}"},
            json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        if response.status_code not in (200, 201, 409):
            raise SandboxError(f"creating namespace {namespace}: {response.status_code} {response.text[:200]}")


def pubsub_clients(cfg: SandboxConfig):
    os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{cfg.ports['pubsub']}"
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def create_topics(cfg: SandboxConfig) -> None:
    publisher, _ = pubsub_clients(cfg)
    for topic in (cfg.events_topic, cfg.schedule_topic, cfg.dead_letter_topic):
        publisher.create_topic(name=publisher.topic_path(cfg.project, topic))


def create_push_subscriptions(cfg: SandboxConfig) -> None:
    """Push subscriptions like production's: retry with backoff, dead-letter after 5 attempts."""
    from google.protobuf import duration_pb2

    publisher, subscriber = pubsub_clients(cfg)
    topics = {"events": cfg.events_topic, "schedule": cfg.schedule_topic}
    for port_name, _, _, kind in FUNCTIONS:
        subscriber.create_subscription(request={
            "name": subscriber.subscription_path(cfg.project, f"meshjoin-{kind}-push"),
            "topic": publisher.topic_path(cfg.project, topics[kind]),
            "push_config": {"push_endpoint": f"{cfg.url(port_name)}/"},
            "ack_deadline_seconds": 60,
            "retry_policy": {
                "minimum_backoff": duration_pb2.Duration(seconds=1),
                "maximum_backoff": duration_pb2.Duration(seconds=10),
            },
            "dead_letter_policy": {
                "dead_letter_topic": publisher.topic_path(cfg.project, cfg.dead_letter_topic),
                "max_delivery_attempts": 5,
            },
        })
    # A pull subscription on the dead-letter topic so what lands there can be inspected.
    subscriber.create_subscription(request={
        "name": subscriber.subscription_path(cfg.project, "meshjoin-dead-letter-pull"),
        "topic": publisher.topic_path(cfg.project, cfg.dead_letter_topic),
    })


def down(state_dir: Path) -> list[str]:
    procs = Processes(state_dir.resolve())
    names = sorted(procs.pids)
    procs.stop_all()
    (state_dir / "world-ready").unlink(missing_ok=True)
    return names
