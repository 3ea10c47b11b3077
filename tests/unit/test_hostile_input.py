"""Hostile and malformed input, property-based (hypothesis).

Anyone who can publish to the events topic controls a message; anyone who can create a VM controls
its labels and every metadata item, including a forged `meshjoin-status`. The properties:

- the event decoder answers a VM key, `BadMessage` or `Ignored`, and nothing else, whatever the bytes;
- the event function acks every such message with exactly one log line (no redelivery loop);
- a label or metadata value can never add a line to cluster.env, /etc/hosts, the mesh config or the
  startup script, and every object for the cluster stays a valid Kubernetes/Istio object;
- the whole reconcile of such a VM (on the in-memory fakes beside the adapters: adapters/compute_fake.py,
  secrets_fake.py, kube_fake.py) ends in an outcome, never a crash, never a private key in metadata, never
  an identity policy forbids, and never touches a WorkloadEntry that is not this VM's.

`MESHJOIN_HYPOTHESIS_PROFILE=full` (used by `make faults`) runs ten times as many examples.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shlex
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshjoin import bootstrap, entrypoints, names, pki, registration
from meshjoin.adapters.compute_fake import FakeCompute
from meshjoin.adapters.kube_fake import FakeKube
from meshjoin.status import State, Status
from meshjoin.adapters.secrets import PluginCa
from meshjoin.adapters.secrets_fake import FakeSecrets
from meshjoin.errors import BadMessage
from meshjoin.events import Ignored, decode_push
from meshjoin.logs import JsonFormatter
from meshjoin.model import Denial, Identity, Vm, VmKey
from meshjoin.policy import decide_identity, parse_ports
from meshjoin.reconcile import Reconciler
from meshjoin.settings import IdentityBinding, Settings, protected_namespace
from meshjoin.sweep import Inventory, plan_sweep


settings.register_profile("bounded", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("full", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("MESHJOIN_HYPOTHESIS_PROFILE", "bounded")
hostile = settings(settings.get_profile(PROFILE))
pytestmark = pytest.mark.faults

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
MAX_AGE = timedelta(hours=1)
PROJECT = "my-project"
ZONE = "us-central1-a"
KEY = VmKey(PROJECT, ZONE, "vm-1")
VM_ACCOUNT = "vm-1@my-project.iam.gserviceaccount.com"
BINDINGS = (IdentityBinding(VM_ACCOUNT, "default", "default", ("vm-1", "web")),
            IdentityBinding("other@my-project.iam.gserviceaccount.com", "apps", "web", ("web",)))
SETTINGS = Settings(project=PROJECT, cluster=f"projects/{PROJECT}/locations/us-central1/clusters/mesh",
                    identity_bindings=BINDINGS,
                    istiod_ip="10.0.0.9", network="vpc-1", mesh_id="mesh1", cert_ttl=timedelta(hours=24))
GCE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
K8S_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
ENV_LINE = re.compile(r"^[A-Z_]+=")
DNS_1123_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")

# --- strategies ---------------------------------------------------------------------------------------

# Text an attacker would try: quotes, newlines, shell metacharacters, unicode, NULs, long runs.
NASTY = st.sampled_from(["", "\n", "\r\n", "'", '"', "$(reboot)", "`id`", "\\", ";", "\x00", "\u2028",
                         "é", "a" * 300, "--", "${IFS}", "EVIL=1", "\nEVIL=1", "'\nEVIL=1\n'"])
TEXT = st.one_of(st.text(max_size=80), NASTY, st.builds(lambda a, b: a + b, st.text(max_size=20), NASTY))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
                    lambda children: st.one_of(st.lists(children, max_size=4),
                                               st.dictionaries(TEXT, children, max_size=4)),
                    max_leaves=12)
METHODS = st.sampled_from(["v1.compute.instances.insert", "beta.compute.instances.delete",
                           "v1.compute.instances.setLabels", "v1.compute.instances.start", "compute.instances.insert",
                           "v2.compute.instances.insert"])
RESOURCE_NAMES = st.one_of(
    st.builds(lambda p, z, i: f"projects/{p}/zones/{z}/instances/{i}",
              st.sampled_from([PROJECT, "123456789012", "other-project", "a" * 40, "x/y"]),
              st.sampled_from([ZONE, "europe-west1-b", "zone", ""]), st.one_of(st.just("vm-1"), TEXT)),
    TEXT, JSON)


@st.composite
def audit_entries(draw):
    """An audit LogEntry with any of its fields replaced by anything."""
    entry = {
        "protoPayload": {"@type": "type.googleapis.com/google.cloud.audit.AuditLog",
                         "serviceName": draw(st.one_of(st.just("compute.googleapis.com"), JSON)),
                         "methodName": draw(st.one_of(METHODS, JSON)),
                         "resourceName": draw(RESOURCE_NAMES)},
        "resource": draw(st.one_of(st.just({"type": "gce_instance",
                                            "labels": {"project_id": PROJECT, "zone": ZONE}}),
                                   st.fixed_dictionaries({"labels": JSON}), JSON)),
        "operation": draw(st.one_of(st.just({"last": True}), st.just({"first": True}),
                                    st.fixed_dictionaries({"first": JSON, "last": JSON}), JSON)),
    }
    for field in draw(st.lists(st.sampled_from(["protoPayload", "resource", "operation"]), max_size=2)):
        entry[field] = draw(JSON)
    return entry


OPERATOR = st.fixed_dictionaries({"project": st.one_of(st.just(PROJECT), JSON),
                                  "zone": st.one_of(st.just(ZONE), JSON),
                                  "instance": st.one_of(st.just("vm-1"), TEXT, JSON)})
PAYLOADS = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda value: json.dumps(value).encode(), st.one_of(JSON, audit_entries(), OPERATOR)),
    st.builds(lambda depth, open_: (open_ * depth).encode(), st.integers(1, 200_000), st.sampled_from(["[", '{"a":'])),
    st.builds(lambda n: b'{"project":"' + b"a" * n + b'"}', st.integers(60_000, 70_000)),
)


@st.composite
def push_bodies(draw):
    """The CloudEvent `data` functions-framework hands over: well-formed envelopes mostly, junk sometimes."""
    payload = draw(PAYLOADS)
    message = {"data": draw(st.one_of(st.just(base64.b64encode(payload).decode()), JSON,
                                      st.just(base64.b64encode(payload).decode()[:-1] + "!"))),
               "messageId": draw(st.one_of(st.integers(0, 10**12).map(str), JSON)),
               "attributes": draw(st.one_of(st.just({}), JSON))}
    message["publishTime"] = draw(st.one_of(st.just("2026-11-21T11:59:59.123Z"), st.just("2026-11-21T11:59:59"),
                                            st.just("2020-01-01T00:00:00Z"), JSON))
    return draw(st.one_of(st.just({"message": message}), st.just({"message": draw(JSON)}), JSON))


# --- the event decoder --------------------------------------------------------------------------------


@hostile
@given(push_bodies())
def test_decoder_answers_a_key_or_a_refusal_and_nothing_else(body):
    try:
        key = decode_push(body, now=NOW, max_age=MAX_AGE)
    except (BadMessage, Ignored) as refusal:
        assert len(str(refusal)) < 400  # refusals quote at most a bounded piece of the input
        return
    assert isinstance(key, VmKey)
    assert GCE_NAME.match(key.instance) and "\n" not in str(key) and len(key.project) <= 93


class LogCapture(logging.Handler):
    """meshjoin's log lines as Cloud Logging would receive them (one JSON object per line)."""

    def __init__(self):
        super().__init__()
        self.stream = io.StringIO()
        self.setFormatter(JsonFormatter())

    def emit(self, record):
        self.stream.write(self.format(record) + "\n")

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


class _Reconciler:
    def reconcile(self, key, cleanup=False):
        return SimpleNamespace(verb="left", reason="the VM no longer exists", state=None, details={})


@hostile
@given(push_bodies())
def test_event_function_acks_every_hostile_message_with_one_log_line(monkeypatch_session, body):
    """What Pub/Sub sees: the handler returns (ack) and says what it did in exactly one line."""
    capture = LogCapture()
    logger = logging.getLogger("meshjoin")
    logger.addHandler(capture)
    try:
        entrypoints.handle_vm_event(SimpleNamespace(data=body))
    finally:
        logger.removeHandler(capture)
    lines = [line for line in capture.lines() if "outcome" in line]
    assert len(lines) == 1, lines
    assert lines[0]["outcome"] in ("rejected", "ignored", "left")
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, dict) and message.get("messageId") is not None:
        assert lines[0]["message_id"] == str(message["messageId"])[:64]


@pytest.fixture(scope="module")
def monkeypatch_session():
    """The event function's runtime, with the reconcile stubbed (the decoder is what is under test)."""
    runtime = SimpleNamespace(settings=SETTINGS, reconciler=_Reconciler())
    mp = pytest.MonkeyPatch()
    mp.setattr(entrypoints, "runtime", lambda: runtime)
    mp.setattr(entrypoints, "utc_now", lambda: NOW)
    yield mp
    mp.undo()


# --- labels and metadata → identity and bootstrap -----------------------------------------------------

LABEL_KEYS = st.sampled_from(["mesh-namespace", "mesh-service-account", "mesh-app", "mesh-version", "other"])
GOOD_VALUES = st.sampled_from(["apps", "default", "web", "v1", "istio-system", "kube-system", "payments", "x" * 63])
LABELS = st.builds(lambda extra: {"mesh": "join", **extra},
                   st.dictionaries(LABEL_KEYS, st.one_of(GOOD_VALUES, TEXT), max_size=5))
PORTS = st.one_of(st.just(""), st.just("http:8080,grpc:9090"), TEXT,
                  st.lists(st.tuples(st.one_of(st.sampled_from(["http", "grpc", "h-2"]), TEXT),
                                     st.one_of(st.integers(-5, 70000).map(str), TEXT)), max_size=5)
                  .map(lambda pairs: ",".join(f"{n}:{p}" for n, p in pairs)))


def vm_with(labels: dict, metadata: dict, service_account: str | None = "vm-1@my-project.iam.gserviceaccount.com",
            key: VmKey = KEY) -> Vm:
    return Vm(key, "4242", labels, metadata, "fp-0", "10.128.0.7", service_account)


def env_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        (out[name],) = shlex.split(value) or [""]
    return out


@hostile
@given(LABELS, PORTS)
def test_labels_and_ports_yield_an_identity_within_policy_or_a_denial(labels, ports):
    decision = decide_identity(vm_with(labels, {"mesh-ports": ports}), SETTINGS)
    if isinstance(decision, Denial):
        assert decision.reason and "\n" not in decision.reason  # values are quoted with repr()
        return
    # Exactly an identity and app the VM's account is bound to, whatever the labels asked.
    assert any((b.namespace, b.service_account) == (decision.namespace, decision.service_account)
               and decision.app in b.apps for b in SETTINGS.bindings_for(VM_ACCOUNT))
    assert not protected_namespace(decision.namespace)
    for value in (decision.namespace, decision.service_account, decision.app, decision.version):
        assert K8S_LABEL_VALUE.match(value) and value
    assert all(DNS_1123_LABEL.match(name) and 1 <= port <= 65535 for name, port in decision.ports.items())


@hostile
@given(LABELS, PORTS)
def test_no_value_adds_a_line_to_cluster_env_hosts_mesh_config_or_the_script(labels, ports):
    decision = decide_identity(vm_with(labels, {"mesh-ports": ports}), SETTINGS)
    if isinstance(decision, Denial):
        return
    items = bootstrap.bootstrap_items(KEY, decision, SETTINGS, root_pem="-----BEGIN CERTIFICATE-----\nR\n")
    reference = bootstrap.vm_env(KEY, Identity("default", "default", "a", "v"), SETTINGS)
    env_text = items[names.CLUSTER_ENV_KEY]
    assert env_text.count("\n") == reference.count("\n")  # one line per variable, whatever the values
    assert all(ENV_LINE.match(line) for line in env_text.splitlines())
    env = env_values(env_text)
    assert env["ISTIO_NAMESPACE"] == decision.namespace and env["SERVICE_ACCOUNT"] == decision.service_account
    assert env["CANONICAL_SERVICE"] == decision.app and env["CANONICAL_REVISION"] == decision.version
    assert json.loads(env["ISTIO_METAJSON_LABELS"])["app"] == decision.app
    # Hosts and mesh config are the deployment's (project metadata): no VM's value can reach them.
    assert not set(items) & set(names.DEPLOYMENT_KEYS)
    shared = bootstrap.deployment_items(SETTINGS)
    assert shared[names.HOSTS_KEY] == "10.0.0.9 istiod.istio-system.svc\n"
    assert set(json.loads(shared[names.MESH_CONFIG_KEY])) == {"defaultConfig"}
    assert items[names.STARTUP_SCRIPT_KEY] == bootstrap.startup_script()  # the script never embeds a value


@hostile
@given(LABELS, PORTS)
def test_cluster_objects_stay_valid_kubernetes_objects(labels, ports):
    vm = vm_with(labels, {"mesh-ports": ports})
    decision = decide_identity(vm, SETTINGS)
    if isinstance(decision, Denial):
        return
    objects = [registration.workload_entry(vm, decision, SETTINGS.network, NOW),
               registration.service_account(decision), registration.service(decision)]
    for obj in filter(None, objects):
        assert yaml.safe_load(yaml.safe_dump(obj)) == obj  # nothing in a value is read back as structure
        meta = obj["metadata"]
        assert DNS_1123_LABEL.match(meta["namespace"]) and len(meta["name"]) <= 253
        assert all(K8S_LABEL_VALUE.match(v) for v in meta["labels"].values())


@hostile
@given(st.dictionaries(TEXT, TEXT, max_size=3))
def test_status_values_round_trip_whatever_the_reason(fields):
    raw = Status(State.ERROR, "".join(fields.values()), extra=tuple(sorted(("x" + k, v) for k, v in fields.items()))).encode()
    assert Status.decode(raw).reason == "".join(fields.values())


@hostile
@given(TEXT)
def test_port_parser_answers_ports_or_a_denial(raw):
    result = parse_ports(raw)
    assert isinstance(result, (dict, Denial))


@hostile
@given(st.sampled_from(["MESHJOIN_NETWORK", "MESHJOIN_MESH_ID", "MESHJOIN_CLUSTER_ID", "MESHJOIN_ISTIOD_IP",
                        "MESHJOIN_ISTIOD_ADDRESS", "MESHJOIN_TRUST_DOMAIN"]), TEXT)
def test_a_setting_is_refused_at_start_or_renders_without_extra_lines(variable, value):
    from meshjoin.errors import SettingsError

    env = {"MESHJOIN_PROJECT": PROJECT, "MESHJOIN_CLUSTER": SETTINGS.cluster, "MESHJOIN_ISTIOD_IP": "10.0.0.9",
           variable: value}
    try:
        s = Settings.from_env(env)
    except SettingsError as exc:
        assert variable in str(exc)
        return
    identity = Identity("default", "default", "vm-1", "latest")
    # One line per known variable, each at most once (an empty mesh id or network is left out, not blank).
    full = Settings.from_env({**env, "MESHJOIN_MESH_ID": "m", "MESHJOIN_NETWORK": "n", variable: "x"}) \
        if variable in ("MESHJOIN_MESH_ID", "MESHJOIN_NETWORK") else \
        Settings.from_env({**env, "MESHJOIN_MESH_ID": "m", "MESHJOIN_NETWORK": "n", variable: value})
    # Lines as bash reads them: split at "\n" only (str.splitlines also splits inside a quoted value at \x85,
    # \u2028, ..., which bash does not).
    known = [line.split("=", 1)[0] for line in bootstrap.cluster_env(KEY, identity, full).split("\n")[:-1]]
    rendered = [line.split("=", 1)[0] for line in bootstrap.cluster_env(KEY, identity, s).split("\n")[:-1]]
    assert len(rendered) == len(set(rendered)) and set(rendered) <= set(known)
    assert bootstrap.cluster_env(KEY, identity, s).count("\n") == len(rendered)
    assert bootstrap.hosts_lines(s).count("\n") <= 1
    assert set(json.loads(bootstrap.mesh_config(s))) == {"defaultConfig"}


# --- the whole reconcile of a VM an attacker described -----------------------------------------------


@pytest.fixture(scope="module")
def plugin_ca(tmp_path_factory) -> PluginCa:
    from meshjoin_sandbox.ca import make_plugin_ca

    directory = tmp_path_factory.mktemp("ca")
    make_plugin_ca(directory)
    files = [(directory / n).read_bytes() for n in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")]
    return PluginCa(pki.load_ca_bundle(*files), ("v1", "v1", "v1", "v1"), "ca-fingerprint")


OTHER = VmKey(PROJECT, ZONE, "victim")


def other_vms_entry() -> dict:
    """A meshjoin-owned WorkloadEntry of ANOTHER VM, which a forged status may name."""
    other = Vm(VmKey(PROJECT, ZONE, "victim"), "7", {"mesh": "join"}, {}, "fp", "10.128.0.9", "v@x")
    return registration.workload_entry(other, Identity("apps", "victim", "victim", "v1"), "", NOW)


FOREIGN = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
           "metadata": {"name": "foreign", "namespace": "apps", "labels": {"app": "foreign"}},
           "spec": {"address": "10.0.0.1"}}
STATUS_KEYS = st.sampled_from(["state", "reason", "identity", "workloadEntry", "keyId", "keyCerts", "certSerial",
                               "certNotBefore", "certNotAfter", "caFingerprint", "instanceId", "confirmedSerial",
                               "rekey", "secret", "warnings"])
FORGED_VALUES = st.one_of(JSON, st.sampled_from([
    "apps/victim-us-central1-a-my-project", "apps/foreign", "kube-system/coredns", "joined", "error", "4242",
    "2026-11-21T00:00:00", "2026-11-21T00:00:00Z", "2999-01-01T00:00:00+00:00", "ca-fingerprint",
    "spiffe://cluster.local/ns/default/sa/default",
    "projects/1/secrets/meshjoin-vm-my-project-us-central1-a-victim/versions/1",
    "projects/1/secrets/meshjoin-vm-my-project-us-central1-a-vm-1/versions/1",
    "0123456789abcdef", "1f", "4", "0123456789abcdef.20261121T000000Z", "../../etc"]))
FORGED_STATUS = st.one_of(TEXT, st.dictionaries(STATUS_KEYS, FORGED_VALUES, max_size=11).map(json.dumps))
METADATA = st.fixed_dictionaries({}, optional={
    "mesh-ports": PORTS, names.STATUS_KEY: FORGED_STATUS,
    names.STARTUP_SCRIPT_KEY: st.one_of(TEXT, st.just(names.STARTUP_SCRIPT_MARKER + "\nold")),
    names.SECRET_KEY: TEXT, names.CLUSTER_ENV_KEY: TEXT, names.CERT_CHAIN_KEY: TEXT, names.REKEY_KEY: TEXT})
# What the VM's agent wrote to its guest attributes: nothing, its CSR, junk, or a forged report.
GUEST = st.sampled_from(["none", "csr", "junk", "report"])
ANY_LABELS = st.one_of(LABELS, st.dictionaries(st.sampled_from(["mesh", "mesh-namespace"]), TEXT, max_size=2))


@hostile
@given(ANY_LABELS, METADATA, st.sampled_from(["vm-1@my-project.iam.gserviceaccount.com",
                                              "123-compute@developer.gserviceaccount.com", None]), GUEST)
def test_reconcile_of_a_hostile_vm_ends_in_an_outcome_and_harms_nobody_else(plugin_ca, labels, metadata, account,
                                                                            guest):
    vm = vm_with(labels, metadata, account)
    compute, secrets = FakeCompute({KEY: vm}), FakeSecrets(plugin_ca, legacy=[KEY, OTHER])
    vm_key = compute.hand_in_key(KEY) if guest == "csr" else None
    if guest == "junk":
        compute.guest[KEY] = {names.CSR_ATTRIBUTE: "-----BEGIN CERTIFICATE REQUEST-----\n$(reboot)\n", "sidecar": "x"}
    elif guest == "report":
        compute.guest[KEY] = {"cert-serial": "1F", "sidecar": "running", "agent-version": "3"}
    kube = FakeKube([other_vms_entry(), FOREIGN])
    bystanders = {k: json.dumps(v, sort_keys=True) for k, v in kube.objects.items()}
    reconciler = Reconciler(SETTINGS, compute, secrets, kube, clock=lambda: NOW)

    outcome = reconciler.reconcile(KEY)
    if not any(k in vm.metadata for k in names.MESHJOIN_KEYS):
        # A VM carrying no meshjoin item gets its bootstrap first (its guest attributes are read from the next
        # pass on: an agent writes nothing there before the bootstrap exists); the pass after it acts on them.
        outcome = reconciler.reconcile(KEY)

    assert outcome.verb in ("registered", "bootstrapped", "delivered", "rechecked", "refreshed", "unchanged",
                            "renewed", "reissued", "rotated", "migrating", "migrated", "left", "denied", "ignored",
                            "failed"), outcome
    after = compute.vms[KEY].metadata
    assert not any("PRIVATE KEY" in value for value in after.values())
    assert {k: json.dumps(v, sort_keys=True) for k, v in kube.objects.items() if k in bystanders} == bystanders
    assert OTHER in secrets.legacy and all(call.endswith(str(KEY)) for call in secrets.calls)  # only its own secret
    decision = decide_identity(vm, SETTINGS)
    entries = [o for o in kube.objects.values() if o["kind"] == "WorkloadEntry"
               and (o["metadata"].get("annotations") or {}).get(names.ANNOTATION_PREFIX + "instance") == "vm-1"]
    chains = [value for item, value in compute.received if item == names.CERT_CHAIN_KEY]
    for chain in chains:  # anything meshjoin signed: the VM's own key, and the identity policy grants
        assert isinstance(decision, Identity) and vm_key is not None
        assert pki.cert_info(chain).spiffe_id == decision.spiffe(SETTINGS.trust_domain)
        assert pki.chain_key_id(chain) == pki.key_id(vm_key.public_key())
    if outcome.state == "joined":
        assert isinstance(decision, Identity)
        assert [e["metadata"]["namespace"] for e in entries] == [decision.namespace]
        assert Status.decode(after[names.STATUS_KEY]).state == "joined"
    else:
        assert entries == []
        if isinstance(decision, Denial):
            assert outcome.verb in ("denied", "left", "ignored")
    # Reconciling again writes nothing: the outcome is a fixed point.
    writes, objects = compute.writes, json.dumps(sorted(map(str, kube.objects.items())))
    reconciler.reconcile(KEY)
    assert (compute.writes, json.dumps(sorted(map(str, kube.objects.items())))) == (writes, objects)


@hostile
@given(st.lists(st.tuples(ANY_LABELS, METADATA), min_size=1, max_size=4))
def test_sweep_plan_survives_any_fleet(plugin_ca, fleet):
    vms = {}
    for index, (labels, metadata) in enumerate(fleet):
        key = VmKey(PROJECT, ZONE, f"vm-{index}")
        vms[key] = vm_with({**labels, "mesh": "join"}, metadata, key=key)
    inventory = Inventory(vms, [other_vms_entry()], [], {})
    plan = plan_sweep(inventory, SETTINGS, plugin_ca.fingerprint, NOW)
    assert all(action.key in vms or action.kind == "prune" for action in plan.actions)


# --- the counterexamples hypothesis found, kept as plain regression tests -----------------------------


def test_a_forged_status_cannot_make_meshjoin_delete_another_vms_entry(plugin_ca):
    forged = json.dumps({"state": "joined", "workloadEntry": "apps/victim-us-central1-a-my-project"})
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {names.STATUS_KEY: forged})})
    kube = FakeKube([other_vms_entry()])
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), kube, clock=lambda: NOW)
    assert reconciler.reconcile(KEY).state == "waiting"  # a forged "joined" is not the VM's confirmation
    assert ("WorkloadEntry", "apps", "victim-us-central1-a-my-project") in kube.objects
    compute.hand_in_key(KEY)
    assert reconciler.reconcile(KEY).verb == "delivered"
    compute.confirm(KEY)
    assert reconciler.reconcile(KEY).state == "joined"
    assert ("WorkloadEntry", "apps", "victim-us-central1-a-my-project") in kube.objects
    assert ("WorkloadEntry", "default", "vm-1-us-central1-a-my-project") in kube.objects


@pytest.mark.parametrize("forged", [
    {"certNotBefore": None},
    {"certNotBefore": "2026-11-21T00:00:00", "certNotAfter": "2026-11-22T00:00:00"},  # no time zone
    {"workloadEntry": ["apps", "x"]},
    {"keyCerts": 7},
    {"rekey": "x\ny"},
], ids=["null time", "naive times", "list entry", "number keyCerts", "multi-line rekey"])
def test_a_forged_status_neither_crashes_the_sweep_nor_the_reconcile(plugin_ca, forged):
    status = {"state": "joined", "identity": "spiffe://cluster.local/ns/default/sa/default", "instanceId": "4242",
              "caFingerprint": "ca-fingerprint", "keyId": "0123456789abcdef", "certSerial": "1f",
              "certNotBefore": "2026-11-21T00:00:00Z", "certNotAfter": "2026-11-22T00:00:00Z", **forged}
    vm = vm_with({"mesh": "join"}, {names.STATUS_KEY: json.dumps(status)})
    plan_sweep(Inventory({KEY: vm}, [], [], {}), SETTINGS, plugin_ca.fingerprint, NOW)
    compute = FakeCompute({KEY: vm})
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW)
    assert reconciler.reconcile(KEY).state == "waiting"
    compute.hand_in_key(KEY)
    assert reconciler.reconcile(KEY).state == "waiting"
    compute.confirm(KEY)
    assert reconciler.reconcile(KEY).state == "joined"


def test_a_status_naming_a_key_the_vm_never_proved_is_not_certified(plugin_ca):
    """The owner forges a status whose keyId is some other key's (a public key is public): renewals re-certify
    only a key the VM proves it holds, so a CSR for another key is certified as a new key, never the forged one."""
    status = {"state": "joined", "identity": "spiffe://cluster.local/ns/default/sa/default", "instanceId": "4242",
              "caFingerprint": "ca-fingerprint", "keyId": "0123456789abcdef", "keyCerts": "1", "certSerial": "1f",
              "confirmedSerial": "1f", "certNotBefore": "2026-11-20T00:00:00Z", "certNotAfter": "2026-11-21T01:00:00Z"}
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {names.STATUS_KEY: json.dumps(status)})})
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), FakeKube(), clock=lambda: NOW)
    outcome = reconciler.reconcile(KEY)  # renewal due, no CSR: nothing signed
    assert names.CERT_CHAIN_KEY not in compute.vms[KEY].metadata and "nothing was certified" in outcome.reason
    vm_key = compute.hand_in_key(KEY)
    reconciler.reconcile(KEY)
    chain = compute.vms[KEY].metadata[names.CERT_CHAIN_KEY]
    assert pki.chain_key_id(chain) == pki.key_id(vm_key.public_key())


def test_a_foreign_object_in_the_way_leaves_nothing_certified(plugin_ca):
    squatter = {**FOREIGN, "metadata": {**FOREIGN["metadata"], "name": "vm-1-us-central1-a-my-project", "namespace": "default"}}
    kube = FakeKube([squatter])
    compute = FakeCompute({KEY: vm_with({"mesh": "join"}, {})})
    compute.hand_in_key(KEY)
    reconciler = Reconciler(SETTINGS, compute, FakeSecrets(plugin_ca), kube, clock=lambda: NOW)
    for _ in range(3):  # every pass: the entry name is taken, so nothing is certified at all
        outcome = reconciler.reconcile(KEY)
        assert outcome.verb == "failed" and "not managed by meshjoin" in outcome.reason
    assert Status.decode(compute.vms[KEY].metadata[names.STATUS_KEY]).state == "error"
    assert names.CERT_CHAIN_KEY not in compute.vms[KEY].metadata
    assert kube.objects[("WorkloadEntry", "default", "vm-1-us-central1-a-my-project")]["spec"] == squatter["spec"]


def test_a_pass_that_fails_after_certifying_leaves_nothing_to_clean_up(plugin_ca):
    from meshjoin.errors import TransientError

    class FlakyCompute(FakeCompute):
        failing = True

        def set_metadata(self, vm, items, remove=frozenset()):
            if self.failing:
                raise TransientError("setMetadata: 503")
            super().set_metadata(vm, items, remove)

    secrets = FakeSecrets(plugin_ca)
    compute = FlakyCompute({KEY: vm_with({"mesh": "join"}, {})})
    reconciler = Reconciler(SETTINGS, compute, secrets, FakeKube(), clock=lambda: NOW)
    compute.failing = False
    assert reconciler.reconcile(KEY).verb == "bootstrapped"  # the agent acts once the bootstrap is there
    compute.failing = True
    compute.hand_in_key(KEY)
    with pytest.raises(TransientError):
        reconciler.reconcile(KEY)
    assert secrets.calls == []  # the certificate of the lost pass is public and unused: nothing to destroy
    compute.failing = False
    assert reconciler.reconcile(KEY).verb == "delivered"
