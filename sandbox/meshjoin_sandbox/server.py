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

from .compute import ComputeEmulator
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


def audit_publisher(cfg: SandboxConfig):
    """The Log Router sink: publish each audit LogEntry JSON to the events topic."""
    os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{cfg.ports['pubsub']}"
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(cfg.project, cfg.events_topic)
    log = logging.getLogger("sandbox.sink")
    methods = sink_methods(cfg.terraform_vars, cfg.project_number)

    def publish(entry: dict) -> None:
        if not sink_accepts(entry, methods):
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
    apps = {
        "compute": ComputeEmulator(world, subnet=cfg.compute_subnet).app,
        "secretmanager": SecretManagerEmulator(world).app,
        "container": ContainerEmulator(world).app,
        "metadata": MetadataEmulator(world).app,
        "control": ControlEmulator(world).app,
    }
    guests = Guests(world, Path(cfg.state_dir) / "vms", dict(cfg.guest_env))
    if not cfg.run_startup_scripts:
        skip_startup_scripts(guests)
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
    guests.shutdown()  # no VM's watcher or startup script outlives the sandbox
    for server in servers:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
