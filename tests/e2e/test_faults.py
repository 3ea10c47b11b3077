"""The fault suite: duplicates, reordering, API faults, killed functions, partial listings, hostile
messages and security checks, all through the whole sandbox (real Pub/Sub emulator, the functions
under functions-framework, the emulators injecting faults through `web.FaultInjector`).

Bounded by default (it runs in `make test`); `make faults` sets MESHJOIN_FAULTS=full for the full
size. Each test records its figures; the module prints them and, with MESHJOIN_FAULTS_REPORT=PATH,
writes them as JSON (RELIABILITY.md quotes such a run).
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets as pysecrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import requests

from meshjoin_sandbox import launcher
from meshjoin_sandbox.client import STATUS_KEY, decode_status

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .conftest import bound, private_key_leaks, running_sandbox, vm_private_keys, wait_for

FULL = os.environ.get("MESHJOIN_FAULTS") == "full"
SIZE = {  # bounded (make test) vs full (make faults)
    "dup_vms": 12 if FULL else 4,
    "burst_vms": 40 if FULL else 10,
    "corpus": 5000 if FULL else 1000,
}
# Kill points: the write the function is stalled in (so it dies after every write before it). A join is
# three passes (issue 14): the bootstrap (instances.setMetadata, `waiting`), the certificate for the CSR
# the VM's agent sends (instances.setMetadata again), and, once the agent confirms, the cluster writes.
# A bootstrap kill point is reached by the VM's creation; the others through the VM's agent.
EVENT_KILL_POINTS = [
    ("compute", "instances.setMetadata", "bootstrap"),      # nothing on the VM yet
    ("compute", "instances.setMetadata", "certificate"),    # bootstrap there, the VM's CSR not answered
    ("kube", "serviceaccounts.create", "confirmation"),     # confirmed, cluster untouched
    ("kube", "workloadentries.create", "confirmation"),     # ServiceAccount made, no entry
    ("kube", "services.create", "confirmation"),            # entry registered, no Service
]
# The sweep lists, plans and publishes each VM's work (issue 16): the writes for a VM whose events were
# missed happen in the events function (the kill points above). The sweep itself is killed in its last
# listing, before it published anything: the redelivered tick must do the whole sweep again.
SWEEP_KILL_POINTS = [("secretmanager", "secrets.list", "inventory")]
if not FULL:
    EVENT_KILL_POINTS = [EVENT_KILL_POINTS[1], EVENT_KILL_POINTS[3]]

FUNCTION_ENV = {
    "MESHJOIN_API_TIMEOUT": "2s",  # so an injected timeout (3 s) costs the client 2 s, not 30
    "MESHJOIN_API_ATTEMPTS": "2",  # fewer in-process retries: Pub/Sub redelivery and the sweep do real work
    "MESHJOIN_PRUNE_CAP": "100",
}
# Each test VM runs as its own account, bound to the identity its test asks for (default/default otherwise).
_APPS_KSA = {**{f"burst-{i}": f"svc-{i % 3}" for i in range(1, 40, 2)},
             **{f"kill-{kind}-{i}": f"kill-{kind}-{i}-sa" for kind in ("ev", "sw") for i in range(6)},
             "kill-ev-orphan": "kill-ev-orphan-sa", "squat-1": "squatter", "victim-1": "victim"}
FAULT_BINDINGS = [
    *(bound(name, "apps", ksa) for name, ksa in _APPS_KSA.items()),
    bound("squat-2", "apps", "default", ["squat-app"]),  # someone else's Service, named on purpose
    *(bound(name) for name in (
        *(f"dup-{kind}-{i}" for kind in ("new", "flip", "gone", "off") for i in range(12)),
        *(f"burst-{i}" for i in range(0, 40, 2)), "corpus-target", "corpus-plain", "list-a-0", "list-a-1",
        "list-b-0", "list-b-1", "deny-istio", "deny-kube", "deny-public", "deny-sa", "deny-ns", "attacker-1")),
]
pytestmark = [pytest.mark.faults, pytest.mark.sandbox]
FIGURES: dict[str, dict] = {}


def sa(name: str) -> str:
    return f"{name}@meshjoin-sandbox.iam.gserviceaccount.com"


# --- the world, seen through the real client libraries ------------------------------------------------


class World:
    """The sandbox plus fast in-process clients (the VM verbs of `meshjoin sandbox` cost a process each)."""

    def __init__(self, sandbox):
        from google.cloud import compute_v1, pubsub_v1, secretmanager_v1
        from google.oauth2.credentials import Credentials

        self.sandbox = sandbox
        self.cfg = sandbox.config
        self.state_dir = sandbox.state_dir
        self.project, self.zone = sandbox.project, sandbox.zone
        self.compute_v1 = compute_v1
        credentials = Credentials(self.cfg["admin_token"])
        options = {"api_endpoint": self.url("compute")}
        self.instances = compute_v1.InstancesClient(transport="rest", client_options=options, credentials=credentials)
        self.operations = compute_v1.ZoneOperationsClient(transport="rest", client_options=options,
                                                          credentials=credentials)
        self.sm = secretmanager_v1.SecretManagerServiceClient(
            transport="rest", client_options={"api_endpoint": self.url("secretmanager")}, credentials=credentials)
        with mock.patch.dict(os.environ, {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{self.cfg['ports']['pubsub']}"}):
            self.publisher = pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(max_messages=200, max_latency=0.05))
            self.subscriber = pubsub_v1.SubscriberClient()
        self.kube = requests.Session()
        self.kube.headers["Authorization"] = f"Bearer {self.cfg['admin_token']}"
        self._log_offsets: dict[str, int] = {}
        self._log_lines: dict[str, list[dict]] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.cfg['ports'][name]}"

    # -- control plane

    def fault(self, emulator: str, method: str, **spec) -> None:
        answer = requests.post(self.url("control") + "/faults", json={"emulator": emulator, "method": method, **spec},
                               timeout=10)
        assert answer.status_code == 200, answer.text

    def clear_faults(self) -> None:
        requests.delete(self.url("control") + "/faults", timeout=10).raise_for_status()

    def fault_stats(self) -> dict:
        return requests.get(self.url("control") + "/faults", timeout=10).json()

    def injected(self) -> int:
        return sum(n for e in self.fault_stats().values() for kinds in e["injected"].values() for n in kinds.values())

    def injected_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for emulator in self.fault_stats().values():
            for kinds in emulator["injected"].values():
                for kind, n in kinds.items():
                    out[kind] = out.get(kind, 0) + n
        return out

    def calls(self, emulator: str, method: str) -> int:
        return self.fault_stats()[emulator]["calls"].get(method, 0)

    # -- Compute, as the VM owner / operator

    def _wait(self, op, zone: str) -> None:
        self.operations.wait(project=self.project, zone=zone, operation=op.name)

    def create_vm(self, name: str, labels: dict | None = None, metadata: dict | None = None,
                  account: str | None = "own", zone: str | None = None, event: bool = True) -> None:
        c = self.compute_v1
        zone = zone or self.zone
        body = c.Instance(name=name, machine_type=f"zones/{zone}/machineTypes/e2-small", labels=labels or {},
                          metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in (metadata or {}).items()]),
                          network_interfaces=[c.NetworkInterface(network="global/networks/default")])
        if account:
            body.service_accounts = [c.ServiceAccount(email=sa(name) if account == "own" else account,
                                                      scopes=["https://www.googleapis.com/auth/cloud-platform"])]
        op = self.instances.insert_unary(project=self.project, zone=zone, instance_resource=body,
                                         metadata=[] if event else [("x-sandbox-no-event", "1")])
        self._wait(op, zone)

    def set_labels(self, name: str, add: dict | None = None, remove: tuple[str, ...] = (), event: bool = True,
                   zone: str | None = None) -> None:
        zone = zone or self.zone
        current = self.instances.get(project=self.project, zone=zone, instance=name)
        labels = {**dict(current.labels), **(add or {})}
        for key in remove:
            labels.pop(key, None)
        request = self.compute_v1.InstancesSetLabelsRequest(labels=labels, label_fingerprint=current.label_fingerprint)
        op = self.instances.set_labels_unary(project=self.project, zone=zone, instance=name,
                                             instances_set_labels_request_resource=request,
                                             metadata=[] if event else [("x-sandbox-no-event", "1")])
        self._wait(op, zone)

    def set_metadata_item(self, name: str, key: str, value: str) -> None:
        current = self.instances.get(project=self.project, zone=self.zone, instance=name)
        items = {i.key: i.value for i in current.metadata.items}
        items[key] = value
        body = self.compute_v1.Metadata(fingerprint=current.metadata.fingerprint,
                                        items=[self.compute_v1.Items(key=k, value=v) for k, v in items.items()])
        op = self.instances.set_metadata_unary(project=self.project, zone=self.zone, instance=name,
                                               metadata_resource=body)
        self._wait(op, self.zone)

    def delete_vm(self, name: str, event: bool = True, zone: str | None = None) -> None:
        zone = zone or self.zone
        op = self.instances.delete_unary(project=self.project, zone=zone, instance=name,
                                         metadata=[] if event else [("x-sandbox-no-event", "1")])
        self._wait(op, zone)

    def vm(self, name: str, zone: str | None = None):
        from google.api_core.exceptions import NotFound

        try:
            return self.instances.get(project=self.project, zone=zone or self.zone, instance=name)
        except NotFound:
            return None

    def metadata(self, name: str, zone: str | None = None) -> dict[str, str]:
        vm = self.vm(name, zone)
        return {i.key: i.value for i in vm.metadata.items} if vm else {}

    def status(self, name: str, zone: str | None = None) -> dict:
        return decode_status(self.metadata(name, zone).get(STATUS_KEY))

    def all_metadata_values(self) -> list[str]:
        request = self.compute_v1.AggregatedListInstancesRequest(project=self.project)
        return [item.value for _, scoped in self.instances.aggregated_list(request=request)
                for vm in scoped.instances for item in vm.metadata.items]

    def delivered(self, name: str, timeout: float = 60.0, zone: str | None = None) -> dict:
        """meshjoin did its part: the bootstrap is on the VM, the status says `waiting` (or later)."""
        return wait_for(lambda: (s := self.status(name, zone)).get("state") in ("waiting", "joined") and s,
                        timeout=timeout, interval=0.3, what=f"{name} delivered")

    def confirm(self, name: str, zone: str | None = None) -> None:
        """Run the VM's own agent now, as its owner would (`sudo google_metadata_script_runner startup`):
        it makes the VM's key, sends its CSR, nudges meshjoin, installs the certificate meshjoin signs,
        reports it and nudges again. Blocks until that run ends (or a boot run before it)."""
        answer = requests.post(self.url("control") + "/run-startup", json={"zone": zone or self.zone, "name": name},
                               timeout=660)
        assert answer.status_code == 200, answer.text

    def create_booted(self, name: str, labels: dict, metadata: dict | None = None) -> None:
        """A VM labelled mesh=join only once it has booted (the common case: GCE runs the agent only at
        boot, so nothing on it acts until its owner runs it): every later pass is the agent's doing."""
        self.create_vm(name, {k: v for k, v in labels.items() if k != "mesh"}, metadata)
        serial = self.state_dir / "vms" / self.zone / name / "serial.log"
        wait_for(lambda: serial.exists() and "(boot)" in serial.read_text(), timeout=30, what=f"{name} booted")
        self.set_labels(name, {"mesh": "join"})

    def confirm_in_background(self, name: str, zone: str | None = None) -> None:
        threading.Thread(target=self.confirm, args=(name, zone), daemon=True, name=f"agent-{name}").start()

    def certs(self, name: str, zone: str | None = None) -> dict[str, str]:
        directory = self.state_dir / "vms" / (zone or self.zone) / name / "root" / "etc" / "certs"
        return {f: (directory / f).read_text() if (directory / f).exists() else ""
                for f in ("key.pem", "key.next.pem", "cert-chain.pem")}

    def wait_joined(self, name: str, timeout: float = 60.0, zone: str | None = None) -> dict:
        """Joined, with nothing done from here to bring it about (no confirmation, no nudge)."""
        return wait_for(lambda: (s := self.status(name, zone)).get("state") == "joined" and s,
                        timeout=timeout, interval=0.3, what=f"{name} joined")

    def joined(self, name: str, timeout: float = 60.0, zone: str | None = None) -> dict:
        """Delivered (waiting), confirmed as the VM's agent would, then joined (issue 13)."""
        if self.delivered(name, timeout, zone).get("state") == "waiting":
            self.confirm(name, zone)
        return self.wait_joined(name, timeout, zone)

    # -- Secret Manager (only the plug-in CA, and per-VM secrets the previous version left)

    def managed_secrets(self) -> list[str]:
        request = {"parent": f"projects/{self.project}", "filter": "labels.managed-by=meshjoin"}
        return [s.name.rsplit("/", 1)[-1] for s in self.sm.list_secrets(request=request)]

    # -- Kubernetes

    def kube_get(self, path: str) -> dict | None:
        # verify per request: a session's `verify` loses to REQUESTS_CA_BUNDLE from the environment
        answer = self.kube.get(f"https://127.0.0.1:{self.cfg['ports']['kube']}{path}", timeout=10,
                               verify=self.cfg["kube_ca_file"])
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        return answer.json()

    def entries_for(self, name: str) -> list[dict]:
        items = self.kube_get("/apis/networking.istio.io/v1/workloadentries")["items"]
        return [e for e in items if (e["metadata"].get("annotations") or {}).get("meshjoin.dev/instance") == name]

    # -- Pub/Sub

    def publish(self, payloads: list[bytes], topic: str | None = None,
                attributes: list[dict] | None = None) -> list[str]:
        path = self.publisher.topic_path(self.project, topic or self.cfg["events_topic"])
        futures = [self.publisher.publish(path, data, **(attributes[i] if attributes else {}))
                   for i, data in enumerate(payloads)]
        return [f.result(timeout=60) for f in futures]

    def dead_letters(self) -> int:
        """Pull (and ack) what reached the dead-letter topic since the last look."""
        path = self.subscriber.subscription_path(self.project, "meshjoin-dead-letter-pull")
        total = 0
        from google.api_core.exceptions import DeadlineExceeded

        while True:
            try:
                response = self.subscriber.pull(request={"subscription": path, "max_messages": 500}, timeout=3)
            except DeadlineExceeded:
                return total
            if not response.received_messages:
                return total
            total += len(response.received_messages)
            self.subscriber.acknowledge(request={"subscription": path,
                                                 "ack_ids": [m.ack_id for m in response.received_messages]})

    def log(self, name: str = "events_fn") -> list[dict]:
        """The function's JSON log lines so far (read incrementally: the corpus makes it long)."""
        path = self.state_dir / "logs" / f"{name}.log"
        lines = self._log_lines.setdefault(name, [])
        with open(path, "rb") as f:
            f.seek(self._log_offsets.get(name, 0))
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._log_offsets[name] = self._log_offsets.get(name, 0) + len(complete)
        for raw in complete.decode(errors="replace").splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"raw": raw}
            lines.append(entry if isinstance(entry, dict) else {"raw": raw})
        return lines

    def by_message(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for entry in self.log():
            if entry.get("message_id"):
                out.setdefault(entry["message_id"], []).append(entry)
        return out

    def tick(self, timeout: float = 90.0) -> dict:
        """One sweep through the real schedule topic; its summary line."""
        before = len([e for e in self.log("maintenance_fn") if e.get("outcome") == "swept"])
        self.publish([json.dumps({"source": "cloud-scheduler", "job": "meshjoin-sweep"}).encode()],
                     topic=self.cfg["schedule_topic"])
        wait_for(lambda: len([e for e in self.log("maintenance_fn") if e.get("outcome") == "swept"]) > before,
                 timeout=timeout, interval=0.3, what="the sweep's summary line")
        return [e for e in self.log("maintenance_fn") if e.get("outcome") == "swept"][before]


def audit(world: World, name: str, verb: str, phase: str, zone: str | None = None) -> bytes:
    """The LogEntry the Log Router sink publishes for a Compute audit event (DESIGN.md's shape)."""
    zone = zone or world.zone
    return json.dumps({
        "protoPayload": {"@type": "type.googleapis.com/google.cloud.audit.AuditLog",
                         "serviceName": "compute.googleapis.com", "methodName": f"v1.compute.instances.{verb}",
                         "resourceName": f"projects/{world.project}/zones/{zone}/instances/{name}",
                         "authenticationInfo": {"principalEmail": "owner@example.com"},
                         "request": {"@type": f"type.googleapis.com/compute.instances.{verb}"}},
        "insertId": pysecrets.token_hex(6),
        "resource": {"type": "gce_instance", "labels": {"instance_id": "1", "project_id": world.project, "zone": zone}},
        "severity": "NOTICE",
        "logName": f"projects/{world.project}/logs/cloudaudit.googleapis.com%2Factivity",
        "operation": {"id": f"operation-{verb}-{name}", "producer": "compute.googleapis.com", phase: True},
    }).encode()


def settled(world: World, message_ids: list[str], timeout: float) -> dict[str, list[dict]]:
    """Wait until each message has its final (non-retrying) log line; answers the lines by message."""
    wanted = set(message_ids)

    def done():
        lines = world.by_message()
        return all(any(e.get("outcome") != "retrying" for e in lines.get(m, [])) for m in wanted) and lines

    lines = wait_for(done, timeout=timeout, interval=0.5, what=f"{len(wanted)} messages handled")
    return {m: lines[m] for m in wanted}


def holds_its_certificate(world: World, name: str, status: dict) -> bool:
    """The VM's own files: key.pem is the key of the leaf in cert-chain.pem, that leaf is the one in
    its metadata, and the status names it (or the watcher is about to install a renewal of it)."""
    certs = world.certs(name)
    if not certs["key.pem"] or not certs["cert-chain.pem"]:
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = serialization.load_pem_private_key(certs["key.pem"].encode(), password=None)
    leaf = x509.load_pem_x509_certificates(certs["cert-chain.pem"].encode())[0]
    delivered = world.metadata(name).get("meshjoin-cert-chain", "")
    delivered_leaf = x509.load_pem_x509_certificates(delivered.encode())[0] if delivered else None
    return key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki) and \
        delivered_leaf is not None and format(delivered_leaf.serial_number, "x") == status.get("certSerial") and \
        delivered_leaf.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)


def invariant_violations(world: World, live: list[str], gone: list[str]) -> dict[str, int]:
    """Counts of what must be zero: live VMs not joined, with other than one entry, or whose files do
    not hold the certificate meshjoin delivered for their own key; any trace of VMs that are gone or
    unlabelled; any per-VM secret (there are none since issue 14)."""
    counts = {"lost": 0, "duplicate_entries": 0, "wrong_certificate": 0, "leftovers": 0}
    for name in live:
        status = world.status(name)
        entries = world.entries_for(name)
        if status.get("state") != "joined" or not entries:
            counts["lost"] += 1
            continue
        counts["duplicate_entries"] += len(entries) - 1
        try:
            good = wait_for(lambda: holds_its_certificate(world, name, world.status(name)), timeout=20,
                            what=f"{name}'s files to match its status")
        except AssertionError:
            good = False
        counts["wrong_certificate"] += not good
    for name in gone:
        counts["leftovers"] += len(world.entries_for(name))
    counts["leftovers"] += len(world.managed_secrets())
    return counts


CLEAN = {"lost": 0, "duplicate_entries": 0, "wrong_certificate": 0, "leftovers": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    with running_sandbox(tmp_path_factory.mktemp("faults"), FUNCTION_ENV, FAULT_BINDINGS) as sandbox:
        yield World(sandbox)
    report(request)


def report(request) -> None:
    path = os.environ.get("MESHJOIN_FAULTS_REPORT")
    summary = {"size": "full" if FULL else "bounded", "figures": FIGURES}
    if path:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            terminal.write_line("")
            terminal.write_line(f"fault suite figures ({summary['size']}):")
            for name, figures in FIGURES.items():
                terminal.write_line(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(autouse=True)
def no_leftover_faults(world):
    yield
    world.clear_faults()


# --- duplicates and reordering --------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_duplicate_and_reversed_events_converge(world):
    """Every audit entry (first + last) delivered 3 times, each VM's history in reverse order."""
    n = SIZE["dup_vms"]
    live_new = [f"dup-new-{i}" for i in range(n)]          # created labelled: [insert]
    live_flip = [f"dup-flip-{i}" for i in range(n)]        # created plain, then labelled: [insert, setLabels]
    gone = [f"dup-gone-{i}" for i in range(n)]             # joined, then deleted: [insert, delete]
    unlabelled = [f"dup-off-{i}" for i in range(n)]        # joined, then unlabelled: [insert, setLabels]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: world.create_vm(name, {"mesh": "join"}), gone + unlabelled))
        list(pool.map(lambda name: world.create_vm(name, {"mesh": "join"}, event=False), live_new))
        list(pool.map(lambda name: world.create_vm(name, event=False), live_flip))
        list(pool.map(lambda name: world.joined(name), gone + unlabelled))
        list(pool.map(lambda name: world.set_labels(name, {"mesh": "join"}, event=False), live_flip))
        list(pool.map(lambda name: world.delete_vm(name, event=False), gone))
        list(pool.map(lambda name: world.set_labels(name, remove=("mesh",), event=False), unlabelled))
    histories = {**{name: ["insert"] for name in live_new}, **{name: ["insert", "setLabels"] for name in live_flip},
                 **{name: ["insert", "delete"] for name in gone},
                 **{name: ["insert", "setLabels"] for name in unlabelled}}
    messages = []
    for name, verbs in histories.items():
        for verb in reversed(verbs):  # the last thing that happened is delivered first
            for phase in ("last", "first"):
                messages += [audit(world, name, verb, phase)] * 3
    ids = world.publish(messages)
    lines = settled(world, ids, timeout=120)
    # meshjoin's part ends at the delivery (issue 13): each live VM's agent now confirms, once.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: world.joined(name), live_new + live_flip))

    violations = invariant_violations(world, live_new + live_flip, gone + unlabelled)
    assert violations == CLEAN
    for name in unlabelled:
        assert world.status(name)["state"] == "left"
    assert world.dead_letters() == 0
    summary = world.tick()
    assert summary["published"] == 0 and summary["pruned"] == 0 and summary["errors"] == 0, summary
    FIGURES["duplicates"] = {"vms": len(histories), "messages": len(ids), "deliveries_per_entry": 3,
                             "redelivered_after_a_concurrent_write": sum(
                                 1 for v in lines.values() for e in v if e.get("outcome") == "retrying"),
                             **violations}


# --- transient faults on every call during a burst of joins -------------------------------------------


def fault_mix(world: World, share: float = 0.3) -> dict[str, float]:
    """`share` of every product call to Compute, Secret Manager and Kubernetes fails: 503, 429, a lost
    answer after the write, or a timeout. Rules draw in order, so each gets its conditional chance."""
    mix = [({"kind": "error", "status": 503}, 0.40), ({"kind": "error", "status": 429}, 0.20),
           ({"kind": "drop", "after": "status", "status": 503}, 0.15), ({"kind": "drop", "after": "close"}, 0.10),
           ({"kind": "timeout", "seconds": 3}, 0.10), ({"kind": "latency", "seconds": 0.5}, 0.05)]
    taken = 0.0
    for seed, emulator in enumerate(("compute", "secretmanager", "kube")):  # Secret Manager: the CA reads
        taken = 0.0
        for spec, part in mix:
            p = share * part / (1 - taken)
            world.fault(emulator, "*", probability=p, principal="product", seed=seed, **spec)
            taken += share * part
    return {f"{spec['kind']}{'/' + str(spec.get('status', spec.get('after', '')))}": share * part for spec, part in mix}


@pytest.mark.timeout(600)
def test_burst_of_joins_with_30_percent_of_calls_failing(world):
    n = SIZE["burst_vms"]
    names = [f"burst-{i}" for i in range(n)]
    before = world.injected()
    fault_mix(world, 0.3)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: world.create_vm(
            names[i], {"mesh": "join", **({"mesh-namespace": "apps", "mesh-service-account": f"svc-{i % 3}"}
                                          if i % 2 else {})},
            {"mesh-ports": f"http:{8000 + i}"} if i % 3 == 0 else {}), range(n)))

    def joined_count() -> int:
        return sum(world.status(name).get("state") == "joined" for name in names)

    # Pub/Sub redelivers a failed push with backoff (1-10 s), 5 times, then dead-letters it: wait
    # until every VM joined, or the function has been idle longer than the longest backoff.
    log_path = world.state_dir / "logs" / "events_fn.log"
    idle = {"size": -1, "since": time.monotonic()}

    agents_started: set[str] = set()

    def start_agents() -> None:
        """Each VM's owner runs its agent once meshjoin's bootstrap is there (the boot run may have come
        before it): its CSR and its confirmation then meet the same faults, through the agent's nudges."""
        for name in names:
            if name not in agents_started and world.status(name).get("state") == "waiting":
                agents_started.add(name)
                world.confirm_in_background(name)

    def settled_or_joined() -> bool:
        start_agents()
        size = log_path.stat().st_size
        if size != idle["size"]:
            idle.update(size=size, since=time.monotonic())
        return joined_count() == n or time.monotonic() - idle["since"] > 12

    wait_for(settled_or_joined, timeout=240 if FULL else 150, interval=1.0, what="the burst handled")
    by_redelivery = joined_count()
    sweeps = 0
    while joined_count() < n and sweeps < 3:  # the sweep, still under the same faults
        world.tick()
        sweeps += 1
    by_sweep_under_faults = joined_count() - by_redelivery
    injected = world.injected() - before
    by_kind = world.injected_by_kind()
    world.clear_faults()
    summary = world.tick()
    for name in names:
        world.joined(name, timeout=30)
    elapsed = time.monotonic() - started
    dead_lettered = world.dead_letters()

    violations = invariant_violations(world, names, [])
    assert violations == CLEAN
    retries = sum(1 for e in world.log()
                  if e.get("outcome") == "retrying" and str(e.get("instance", "")).startswith("burst-"))
    FIGURES["burst_30pct"] = {"vms": n, "injected_faults": injected, "by_kind": by_kind,
                              "failed_deliveries": retries, "dead_lettered": dead_lettered,
                              "joined_by_event_or_redelivery": by_redelivery,
                              "joined_by_sweep_under_faults": by_sweep_under_faults, "sweeps_under_faults": sweeps,
                              "joined_by_final_sweep": summary["published_join"], "seconds": round(elapsed, 1), **violations}
    assert injected > n  # the faults really happened


# --- a function killed between two writes of a join ----------------------------------------------------


def stall_and_kill(world: World, function: str, emulator: str, method: str, trigger) -> None:
    """Stall the function in `method` (a timeout fault that never applies the call), SIGKILL its whole
    process group while it waits, and start it again."""
    before = world.fault_stats()[emulator]["injected"].get(method, {}).get("timeout", 0)
    world.fault(emulator, method, kind="timeout", seconds=120, count=1, principal="product")
    trigger()
    wait_for(lambda: world.fault_stats()[emulator]["injected"].get(method, {}).get("timeout", 0) > before,
             timeout=60, interval=0.2, what=f"{function} stalled in {method}")
    launcher.restart_function(world.state_dir, function)
    world.clear_faults()  # the stalled call answers its dead client; the write never happened


def vm_args(i: int, name: str) -> tuple[dict, dict]:
    """Labels and metadata that make a first join do every write: own ServiceAccount, a Service."""
    return ({"mesh": "join", "mesh-namespace": "apps", "mesh-service-account": f"{name}-sa"},
            {"mesh-ports": f"http:{9000 + i}"})


@pytest.mark.timeout(600)
def test_event_function_killed_between_writes_is_completed_by_redelivery(world):
    names, started = [], time.monotonic()
    by_sweep = 0
    for i, (emulator, method, stage) in enumerate(EVENT_KILL_POINTS):
        name = f"kill-ev-{i}"
        labels, metadata = vm_args(i, name)
        if stage == "bootstrap":  # killed in the pass the insert event starts
            stall_and_kill(world, "events_fn", emulator, method, lambda: world.create_vm(name, labels, metadata))
        else:  # killed in a pass the agent's nudge starts: the one for its CSR, or for its confirmation
            world.create_booted(name, labels, metadata)  # labelled after boot: its agent has not run
            world.delivered(name)
            stall_and_kill(world, "events_fn", emulator, method, lambda: world.confirm_in_background(name))
        try:
            # Pub/Sub redelivers the message the dead function was handling; the agent's own run (or a
            # new one) completes the rest. (After many failed pushes, e.g. the burst before, the emulator
            # was seen to hold a message back for minutes: then it is the sweep's job.)
            world.joined(name, timeout=25)
        except AssertionError:
            by_sweep += 1
            world.tick()
            world.joined(name, timeout=30)
        names.append(name)
    # The same, and the VM is deleted while the function is down (its delete event is lost): the
    # redelivered insert finds no VM and removes what the dead pass wrote.
    orphan = "kill-ev-orphan"
    labels, metadata = vm_args(99, orphan)
    stall_and_kill(world, "events_fn", "compute", "instances.setMetadata",
                   lambda: world.create_vm(orphan, labels, metadata))
    world.delete_vm(orphan, event=False)
    summary = world.tick()
    wait_for(lambda: not world.entries_for(orphan), timeout=60, what="the orphan's entry removed")
    for name in names:
        status = world.status(name)
        assert world.kube_get(f"/api/v1/namespaces/apps/serviceaccounts/{name}-sa") is not None
        assert world.kube_get(f"/api/v1/namespaces/apps/services/{name}") is not None
        assert status["workloadEntry"] == f"apps/{name}-{world.zone}-{world.project}"
    final = world.tick()
    violations = invariant_violations(world, names, [orphan])
    assert violations == CLEAN
    assert final["pruned"] == 0 and final["published"] == 0, final  # nothing left behind for a sweep to do
    FIGURES["kill_events_fn"] = {"kill_points": [f"{m} ({stage})" for _, m, stage in EVENT_KILL_POINTS] +
                                 ["instances.setMetadata+delete"],
                                 "kills": len(EVENT_KILL_POINTS) + 1, "completed_by_redelivery":
                                 len(names) - by_sweep, "completed_by_sweep": by_sweep,
                                 "sweep_pruned": summary["pruned"] + summary["published_prune"],
                                 "seconds": round(time.monotonic() - started, 1), **violations}


@pytest.mark.timeout(600)
def test_sweep_killed_between_writes_is_completed_by_the_next_sweep(world):
    names, started = [], time.monotonic()
    for i, (emulator, method, _stage) in enumerate(SWEEP_KILL_POINTS):
        name = f"kill-sw-{i}"
        labels, metadata = vm_args(50 + i, name)
        world.create_vm(name, labels, metadata, event=False)  # a missed event: only the sweep joins it
        stall_and_kill(world, "maintenance_fn", emulator, method, lambda: world.publish(
            [b'{"source": "cloud-scheduler"}'], topic=world.cfg["schedule_topic"]))
        # Pub/Sub redelivers the killed sweep's tick: the next sweep (or, if dead-lettered meanwhile,
        # the next scheduled tick) delivers the bootstrap; then the VM's agent does the rest.
        try:
            world.joined(name, timeout=25)
        except AssertionError:
            world.tick()
            world.joined(name, timeout=30)
        names.append(name)
    time.sleep(3)  # let a redelivered tick's sweep finish, so the next summary is our own
    final = world.tick()
    violations = invariant_violations(world, names, [])
    assert violations == CLEAN
    assert final["published"] == 0 and final["pruned"] == 0, final
    FIGURES["kill_maintenance_fn"] = {"kill_points": [f"{m} ({stage})" for _, m, stage in SWEEP_KILL_POINTS], "kills": len(names),
                                      "seconds": round(time.monotonic() - started, 1), **violations}


# --- a failing or partial inventory during a sweep deletes nothing -------------------------------------

DELETIONS = [("kube", "workloadentries.delete"), ("kube", "services.delete"), ("secretmanager", "secrets.delete")]


@pytest.mark.timeout(480)
def test_failing_or_partial_listings_delete_nothing(world):
    names = [("list-a-0", "us-central1-a"), ("list-a-1", "us-central1-a"),
             ("list-b-0", "us-central1-b"), ("list-b-1", "us-central1-b")]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda nz: world.create_vm(nz[0], {"mesh": "join"}, {"mesh-ports": "http:7000"}, zone=nz[1]),
                      names))
        list(pool.map(lambda nz: world.joined(nz[0], zone=nz[1]), names))
    scenarios = {
        "aggregatedList 503": [("compute", "instances.aggregatedList", {"count": 50})],
        "aggregatedList 429": [("compute", "instances.aggregatedList", {"status": 429, "count": 50})],
        "zone b unreachable": [("compute", "instances.aggregatedList", {"kind": "partial", "zone": "us-central1-b"})],
        "zone b silently missing": [("compute", "instances.aggregatedList",
                                     {"kind": "partial", "zone": "us-central1-b", "mark": False})],
        "partial + re-read failing": [("compute", "instances.aggregatedList",
                                       {"kind": "partial", "zone": "us-central1-b"}),
                                      ("compute", "instances.get", {"count": 50})],
        "WorkloadEntry list 503": [("kube", "workloadentries.list", {"count": 50})],
        "secrets list 503": [("secretmanager", "secrets.list", {"count": 50})],
    }
    deleted_before = sum(world.calls(e, m) for e, m in DELETIONS)
    outcomes, published_prunes = {}, {}
    for scenario, faults in scenarios.items():
        for emulator, method, spec in faults:
            world.fault(emulator, method, principal="product", **spec)
        # A quota error is retried until the backoff outlasts the quota's minute (~92 s): a longer wait.
        summary = world.tick(timeout=200 if "429" in scenario else 90)
        world.clear_faults()
        outcomes[scenario] = summary["pruned"]
        assert summary["pruned"] == 0, (scenario, summary)
        # A prune the sweep published (a zone the listing silently left out, unmarked) is the events
        # function's to judge: it re-reads the VM, finds it live and labelled, and deletes nothing. Wait
        # until it has handled every message of this sweep, so the deletions counted below include them.
        published_prunes[scenario] = summary["published_prune"]
        if summary["published"]:
            wait_for(lambda: len([e for e in world.log() if e.get("sweep") == summary["sweep"]
                                  and e.get("outcome") != "retrying"]) >= summary["published"],
                     timeout=120, what=f"the events function's handling of sweep {summary['sweep']}")
    deletions = sum(world.calls(e, m) for e, m in DELETIONS) - deleted_before
    assert deletions == 0
    for name, zone in names:
        assert world.status(name, zone)["state"] == "joined" and len(world.entries_for(name)) == 1
        assert world.metadata(name, zone).get("meshjoin-cert-chain")
    # The same sweep does prune once the listing is whole and the VM really is gone.
    world.delete_vm("list-a-0", event=False)
    assert world.tick()["published_prune"] >= 1
    wait_for(lambda: world.entries_for("list-a-0") == [], timeout=60, what="list-a-0's entry pruned")
    FIGURES["listing_faults"] = {"scenarios": len(scenarios), "sweeps": len(scenarios), "deletions": deletions,
                                 "pruned": sum(outcomes.values()),
                                 "prunes_published_and_refused_by_the_vms_truth": sum(published_prunes.values())}


# --- a corpus of hostile messages through the real Pub/Sub emulator ------------------------------------


def corpus(world: World, size: int, seed: int = 8) -> list[tuple[bytes, dict]]:
    """Generated messages: junk bytes, JSON of every shape, audit entries bent every way, operator
    messages with hostile names, nesting bombs, oversized bodies. (data, attributes) pairs."""
    rng = random.Random(seed)
    nasty = ["", "\n", "'", '"', "$(reboot)", "`id`", "\\", ";", "\x00", "\u2028", "é", "A" * 70, "../..",
             "vm-1\nEVIL=1", "x' -o 'y", "<script>", "${IFS}", "-" * 64]
    project = world.project

    def text():
        return rng.choice(nasty) + "".join(rng.choice("abcXYZ-_/.:019 \n'\"") for _ in range(rng.randint(0, 12)))

    def junk_json(depth=0):
        choices = [lambda: None, rng.random, lambda: rng.randint(-10**9, 10**9), text, lambda: True,
                   lambda: [junk_json(depth + 1) for _ in range(rng.randint(0, 3))],
                   lambda: {text(): junk_json(depth + 1) for _ in range(rng.randint(0, 3))}]
        return rng.choice(choices if depth < 3 else choices[:5])()

    def entry():
        e = json.loads(audit(world, rng.choice(["corpus-target", "no-such-vm", "x"]), rng.choice(
            ["insert", "delete", "setLabels"]), rng.choice(["last", "first"])))
        bend = rng.randint(0, 7)
        if bend == 0:
            e["protoPayload"]["serviceName"] = text()
        elif bend == 1:
            e["protoPayload"]["methodName"] = rng.choice(["v1.compute.instances.start", text(), 7])
        elif bend == 2:
            e["protoPayload"]["resourceName"] = rng.choice([
                text(), f"projects/{project}/zones/{text()}/instances/a",
                f"projects/{project}/zones/us-central1-a/instances/{text()}"])
        elif bend == 3:
            e["resource"] = junk_json()
        elif bend == 4:
            e["operation"] = junk_json()
        elif bend == 5:
            e["protoPayload"] = junk_json()
        elif bend == 6:
            e["protoPayload"]["resourceName"] = "projects/123456789012/zones/us-central1-a/instances/no-such-vm"
        return e

    def operator():
        fields = {"project": project, "zone": world.zone, "instance": "no-such-vm"}
        bend = rng.randint(0, 5)
        if bend == 0:
            fields[rng.choice(list(fields))] = text()
        elif bend == 1:
            fields[rng.choice(list(fields))] = junk_json()
        elif bend == 2:
            fields["project"] = "other-project"
        elif bend == 3:
            fields["instance"] = rng.choice(["corpus-target", "corpus-plain"])
        elif bend == 4:
            del fields[rng.choice(list(fields))]
        return fields

    messages = []
    for i in range(size):
        kind = i % 10
        attributes = ({rng.choice(["source", "x", "eventType"]): text().replace("\x00", "")[:40]}
                      if rng.random() < 0.1 else {})
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
        elif kind == 1:
            data = json.dumps(junk_json()).encode()
        elif kind in (2, 3, 4):
            data = json.dumps(entry()).encode()
        elif kind in (5, 6, 7):
            data = json.dumps(operator()).encode()
        elif kind == 8:
            data = rng.choice([b"[" * rng.randint(5_000, 60_000), b'{"a":' * rng.randint(5_000, 12_000),
                               b'{"project": "' + b"a" * rng.randint(66_000, 90_000) + b'"}',
                               base64.b64encode(b"not json").decode().encode()])
        else:
            data = rng.choice([b"", b"null", b"{}", b'{"protoPayload": null}', b"\xff\xfe", "é".encode("utf-16")])
            if not data:
                attributes = attributes or {"empty": "1"}  # Pub/Sub needs data or attributes
        messages.append((data, attributes))
    return messages


@pytest.mark.timeout(900)
def test_hostile_corpus_is_acked_with_one_clear_line_each(world):
    world.create_vm("corpus-target", {"mesh": "join"})
    world.create_vm("corpus-plain")
    world.joined("corpus-target")
    messages = corpus(world, SIZE["corpus"])
    log_path = world.state_dir / "logs" / "events_fn.log"
    log_start = log_path.stat().st_size
    started = time.monotonic()
    ids = world.publish([data for data, _ in messages], attributes=[attrs for _, attrs in messages])
    assert len(set(ids)) == len(messages) >= 1000
    lines = settled(world, ids, timeout=600)
    handled_in = time.monotonic() - started
    time.sleep(3)  # anything redelivered would log a second line by now
    lines = {m: world.by_message()[m] for m in ids}
    outcomes: dict[str, int] = {}
    for message_id, entries in lines.items():
        assert len(entries) == 1, (message_id, entries)  # one line, no retry, no redelivery
        line = entries[0]
        assert line["severity"] in ("INFO", "WARNING") and line["message"] and line["outcome"], line
        outcomes[line["outcome"]] = outcomes.get(line["outcome"], 0) + 1
    assert set(outcomes) <= {"rejected", "ignored", "left", "unchanged", "refreshed"}, outcomes
    assert world.dead_letters() == 0
    with open(log_path, "rb") as f:  # what the function printed while handling the corpus
        f.seek(log_start)
        log_text = f.read().decode(errors="replace")
    assert "Traceback" not in log_text and "Exception on" not in log_text
    assert world.status("corpus-target")["state"] == "joined" and len(world.entries_for("corpus-target")) == 1
    FIGURES["hostile_corpus"] = {"messages": len(ids), "acked_once": len(lines), "outcomes": outcomes,
                                 "redelivered": 0, "dead_lettered": 0, "seconds": round(handled_in, 1)}


# --- security -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_reserved_namespaces_and_foreign_service_accounts_are_denied(world):
    claims = {"deny-istio": {"mesh-namespace": "istio-system"}, "deny-kube": {"mesh-namespace": "kube-system"},
              "deny-public": {"mesh-namespace": "kube-public"},
              "deny-sa": {"mesh-namespace": "payments", "mesh-service-account": "admin"},
              "deny-ns": {"mesh-namespace": "not-allowed"}}
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda item: world.create_vm(item[0], {"mesh": "join", **item[1]}, {"mesh-ports": "http:80"}),
                      claims.items()))
    for name in claims:
        status = wait_for(lambda: (s := world.status(name)).get("state") == "denied" and s, what=f"{name} denied")
        assert status["reason"]
        assert world.entries_for(name) == [] and "meshjoin-cert-chain" not in world.metadata(name)
        assert "meshjoin-cluster-env" not in world.metadata(name)
    for namespace in ("istio-system", "kube-system", "kube-public"):
        assert world.kube_get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default") is not None
        services = world.kube_get(f"/api/v1/namespaces/{namespace}/services")["items"]
        assert not any(s["metadata"]["name"].startswith("deny-") for s in services)
    FIGURES["denials"] = {"claims": len(claims), "denied": len(claims), "objects_written": 0}


@pytest.mark.timeout(300)
def test_an_object_meshjoin_does_not_own_is_never_modified_or_deleted(world):
    name = "squat-1"
    planted = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": f"{name}-{world.zone}-{world.project}", "namespace": "apps",
                            "labels": {"app": "theirs"}},
               "spec": {"address": "10.9.9.9", "labels": {"app": "theirs"}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "squat-app", "namespace": "apps"},
               "spec": {"selector": {"app": "someone-else"}, "ports": [{"name": "http", "port": 80}]}}
    for obj in (planted, service):
        result = world.sandbox.run("kubectl", "apply", "-f", "-", input=json.dumps(obj))
        assert "created" in result.stdout
    path = f"/apis/networking.istio.io/v1/namespaces/apps/workloadentries/{name}-{world.zone}-{world.project}"
    before = world.kube_get(path)
    service_before = world.kube_get("/api/v1/namespaces/apps/services/squat-app")

    world.create_vm(name, {"mesh": "join", "mesh-namespace": "apps", "mesh-service-account": "squatter"})
    # The entry name is checked before anything is delivered: a VM that can never be registered gets no key.
    status = wait_for(lambda: (s := world.status(name)).get("state") == "error" and s, what=f"{name} in error")
    assert "not managed by meshjoin" in status["reason"] and f"{name}-{world.zone}-{world.project}" in status["reason"]
    assert world.kube_get(path) == before
    # No certificate for a VM that did not join: its CSR is never even read.
    assert "meshjoin-cert-chain" not in world.metadata(name)

    world.create_vm("squat-2", {"mesh": "join", "mesh-namespace": "apps", "mesh-app": "squat-app"},
                    {"mesh-ports": "http:80"})
    world.joined("squat-2")
    assert world.kube_get("/api/v1/namespaces/apps/services/squat-app") == service_before

    for vm in (name, "squat-2"):
        world.delete_vm(vm)
    wait_for(lambda: world.entries_for("squat-2") == [], what="squat-2 left")
    world.tick()
    assert world.kube_get(path) == before
    assert world.kube_get("/api/v1/namespaces/apps/services/squat-app") == service_before
    FIGURES["foreign_objects"] = {"planted": 2, "modified": 0, "deleted": 0}


@pytest.mark.timeout(300)
def test_a_forged_status_cannot_remove_another_vms_entry(world):
    world.create_vm("victim-1", {"mesh": "join", "mesh-namespace": "apps", "mesh-service-account": "victim"})
    victim = world.joined("victim-1")
    world.create_vm("attacker-1", {"mesh": "join"})
    world.joined("attacker-1")
    forged = {**world.status("attacker-1"), "workloadEntry": victim["workloadEntry"],
              "keyId": victim["keyId"], "certSerial": victim["certSerial"]}
    world.set_metadata_item("attacker-1", "meshjoin-status", json.dumps(forged))
    world.set_labels("attacker-1", {"mesh-version": "v2"})  # an event: the attacker's VM is reconciled
    wait_for(lambda: world.status("attacker-1").get("workloadEntry") ==
             f"default/attacker-1-{world.zone}-{world.project}",
             what="the attacker's status rewritten")
    world.tick()
    assert len(world.entries_for("victim-1")) == 1
    assert world.status("victim-1")["certSerial"] == victim["certSerial"]
    assert holds_its_certificate(world, "victim-1", world.status("victim-1"))
    # The attacker's forged key id made meshjoin certify nothing but the attacker's own key.
    attacker_chain = world.metadata("attacker-1")["meshjoin-cert-chain"]
    assert x509.load_pem_x509_certificates(attacker_chain.encode())[0].serial_number != int(victim["certSerial"], 16)
    FIGURES["forged_status"] = {"attempts": 1, "victim_entries_removed": 0, "victim_certificates_changed": 0}


@pytest.mark.timeout(300)
def test_zz_no_private_key_outside_the_vms_after_every_fault_above(world):
    """Last in the module: scans what every test before it left behind (all metadata, every secret,
    every Kubernetes object, every log, the CLI's view of a sample of VMs) for any VM's key."""
    sample = [n for n in ("victim-1", "attacker-1", "burst-0") if world.vm(n)]  # the default zone's
    leaks = private_key_leaks(world.sandbox, sample)
    assert leaks == []
    keys = vm_private_keys(world.sandbox)
    assert world.managed_secrets() == []
    FIGURES["security_scan"] = {"vm_keys": len(keys), "private_keys_outside_the_vms": len(leaks),
                                "per_vm_secrets": 0}
