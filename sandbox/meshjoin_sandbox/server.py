"""The world process: hosts every Google/Kubernetes emulator of the sandbox on its own loopback port.

Started by `meshjoin sandbox up` as `python -m meshjoin_sandbox.server STATE_DIR`; reads
STATE_DIR/sandbox.json (ports, tokens, names), seeds the plug-in CA into Secret Manager and writes
STATE_DIR/world-ready when every server answers.
"""

from __future__ import annotations

import json
import re
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .compute import ComputeEmulator, ComputeProjects
from .config import SandboxConfig
from .container import ContainerEmulator
from .guest import Guests
from .lifecycle import Timing
from .control import ControlEmulator
from .kube import KubeEmulator
from .metadata import MetadataEmulator
from .secretmanager import SecretManagerEmulator
from .stats import counted
from .web import serve
from .world import World

CA_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
_SINK_METHOD = re.compile(r'"(v1|beta)\.(compute\.instances\.[A-Za-z]+)"')


def sink_methods(terraform_vars: dict | None = None, project_number: str | None = None) -> frozenset[str]:
    """The `methodName`s the Log Router sink forwards, read from its filter in deploy/terraform
    (google_logging_project_sink.vm_events): one source of truth, so an audit entry the deployed sink
    would drop never reaches the sandbox's functions either."""
    from .config import sandbox_terraform_vars
    from .terraform import default_terraform_dir, load_terraform

    variables = terraform_vars or sandbox_terraform_vars(
        "meshjoin-sandbox", "us-central1", "projects/meshjoin-sandbox/locations/us-central1/clusters/mesh",
        "meshjoin-functions@meshjoin-sandbox.iam.gserviceaccount.com")
    model = load_terraform(default_terraform_dir(), variables, project_number=project_number)
    (sink,) = [r for r in model.resources("google_logging_project_sink") if r["_name"] == "vm_events"]
    return frozenset(f"{version}.{method}" for version, method in _SINK_METHOD.findall(sink["filter"]))


def sink_accepts(entry: dict, methods: frozenset[str] | None = None) -> bool:
    """Whether the sink's filter lets this audit entry through to the events topic."""
    methods = methods if methods is not None else sink_methods()
    return entry.get("protoPayload", {}).get("methodName", "") in methods


_SINK_LOG = re.compile(r'logName="projects/([^/"]+)/logs/cloudaudit\.googleapis\.com%2Factivity"')


def sink_routes(terraform_vars: dict, project_number: str | None, events_topic: str) -> dict[str, frozenset[str]]:
    """Per project, the `methodName`s its Log Router sink(s) in deploy/terraform forward to the events
    topic: every google_logging_project_sink whose destination is that topic, in the project the sink
    lives in (its `project`, else the provider's). A sink sees only its own project's log, so one whose
    filter names another project's logName forwards nothing (a project without a sink: nothing)."""
    from .terraform import default_terraform_dir, load_terraform

    model = load_terraform(default_terraform_dir(), terraform_vars, project_number=project_number)
    routes: dict[str, set[str]] = {}
    for sink in model.resources("google_logging_project_sink"):
        if not sink["destination"].endswith(f"/topics/{events_topic}"):
            continue
        project = sink.get("project") or model.provider_project()
        logged = _SINK_LOG.search(sink["filter"])
        if logged is None or logged.group(1) != project:
            continue
        methods = {f"{version}.{method}" for version, method in _SINK_METHOD.findall(sink["filter"])}
        routes.setdefault(project, set()).update(methods)
    return {project: frozenset(methods) for project, methods in routes.items()}


def entry_project(entry: dict) -> str:
    return str(((entry.get("resource") or {}).get("labels") or {}).get("project_id", ""))


def audit_publisher(cfg: SandboxConfig):
    """The Log Router sinks: publish each audit LogEntry JSON to the events topic when a sink of the
    entry's own project forwards its method (deploy/terraform: the host's sink, and one per further VM
    project in var.vm_projects)."""
    os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{cfg.ports['pubsub']}"
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(cfg.project, cfg.events_topic)
    log = logging.getLogger("sandbox.sink")
    routes = sink_routes(cfg.terraform_vars, cfg.project_number, cfg.events_topic)

    def publish(entry: dict) -> None:
        if not sink_accepts(entry, routes.get(entry_project(entry), frozenset())):
            return
        future = publisher.publish(topic, json.dumps(entry).encode())
        future.add_done_callback(lambda f: f.exception() and log.error("sink publish failed: %s", f.exception()))

    return publish


def build_world(cfg: SandboxConfig) -> World:
    world = World(
        project=cfg.project,
        project_number=cfg.project_number,
        region=cfg.region,
        zone=cfg.zone,
        cluster_name=cfg.cluster_name,
        state_dir=cfg.state_dir,
        service_account=cfg.service_account,
        sa_token=cfg.sa_token,
        admin_token=cfg.admin_token,
        operator_email=cfg.operator_email,
        terraform_vars=dict(cfg.terraform_vars),
        projects=dict(cfg.projects),
        kube_endpoint=f"127.0.0.1:{cfg.ports['kube']}",
        kube_ca_pem=Path(cfg.kube_ca_file).read_text(),
        timing=Timing(boot_seconds=cfg.boot_seconds, stop_seconds=cfg.stop_seconds,
                      operation_seconds=cfg.operation_seconds, time_factor=cfg.time_factor),
    )
    world.publish_audit = audit_publisher(cfg)
    return world


def seed_plugin_ca(secrets: SecretManagerEmulator, cfg: SandboxConfig) -> None:
    """The operator's upload of Istio's plug-in CA files, one secret per file."""
    for filename, secret_id in zip(CA_FILES, cfg.ca_secrets):
        data = (Path(cfg.ca_dir) / filename).read_bytes()
        secrets.put(secret_id, data, labels={"meshjoin-role": "plugin-ca"})


def skip_startup_scripts(guests: Guests) -> None:
    """Boots that run no startup script (SandboxConfig.run_startup_scripts=False): the boot is still
    counted, and each VM still has its own metadata server for whoever plays its agent."""
    def boot(zone: str, name: str) -> None:
        guests.boots[(zone, name)] = guests.boots.get((zone, name), 0) + 1

    guests.boot = boot


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state_dir = Path(argv[0])
    cfg = SandboxConfig.load(state_dir)
    world = build_world(cfg)
    # One Compute emulator per sandbox project, all behind Compute's one endpoint (routed by project).
    computes = {project: ComputeEmulator(world, subnet=cfg.subnet(project), project=project)
                for project in cfg.projects}
    apps = {
        "compute": ComputeProjects(computes, cfg.project).app,
        "secretmanager": SecretManagerEmulator(world).app,
        "container": ContainerEmulator(world).app,
        "metadata": MetadataEmulator(world).app,
        "control": ControlEmulator(world).app,
    }
    all_guests = [Guests(world, cfg.vms_dir(project), dict(cfg.guest_env), project=project)
                  for project in cfg.projects]
    if not cfg.run_startup_scripts:
        for each in all_guests:
            skip_startup_scripts(each)
    servers = [serve(counted(name, app), "127.0.0.1", cfg.ports[name], name=name) for name, app in apps.items()]
    kube = KubeEmulator(world, cfg.crd_path)
    world.emulators.setdefault("kube", kube)  # for the control plane's /seed
    servers.append(
        serve(counted("kube", kube.app), "127.0.0.1", cfg.ports["kube"], ssl_context=(cfg.kube_cert_file, cfg.kube_key_file), name="kube")
    )
    seed_plugin_ca(world.emulators["secretmanager"], cfg)
    (state_dir / "world-ready").write_text(str(os.getpid()))
    logging.info("sandbox world serving on %s", cfg.ports)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for each in all_guests:
        each.shutdown()  # no VM's watcher or startup script outlives the sandbox
    for server in servers:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
