"""The sweep plans; the events function works (issue 16): what a sweep publishes, how it paces and
defers, and what the event path does with a published (or forged) work. In-memory fakes, no I/O."""

from __future__ import annotations

import base64
import json
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from datetime import timedelta

import pytest

from meshjoin import capacity, names
from meshjoin.adapters.fake_pubsub import InMemoryPublisher
from meshjoin.adapters.pubsub import PubSubPublisher
from meshjoin.events import decode_work
from meshjoin.model import VmKey
from meshjoin.sweep import Sweeper, new_sweep_id

from .test_hostile_input import plugin_ca  # noqa: F401 - a fixture
from .test_hostile_tenant import NOW, ORDERS, PROJECT, SETTINGS, ZONE, World, join, vm

LATER = NOW + timedelta(hours=13)  # past every 24 h certificate's renewal point (at most 50 % of its life)


def key(name: str) -> VmKey:
    return VmKey(PROJECT, ZONE, name)


def joined_world(ca, names_, settings=SETTINGS, publisher=None) -> World:
    world = World(ca, [vm(n, ORDERS, metadata={"mesh-ports": "http:8080"}) for n in names_], settings=settings)
    for name in names_:
        join(world, key(name))
    world.sweeper = Sweeper(settings, world.reconciler, clock=lambda: NOW, publisher=publisher)
    return world


def at(world: World, when) -> None:
    world.reconciler.clock = lambda: when
    world.sweeper.clock = lambda: when


def push(message: dict, when=LATER) -> dict:
    """The CloudEvent data of a Pub/Sub push carrying `message` (what functions-framework hands over)."""
    return {"message": {"data": base64.b64encode(json.dumps(message).encode()).decode(),
                        "messageId": "1", "publishTime": when.isoformat()}}


def deliver(world: World, message: dict, when=LATER):
    """The events function's path for one message (entrypoints.handle_vm_event without the runtime)."""
    work = decode_work(push(message, when), now=when, max_age=timedelta(hours=1))
    return work, world.reconciler.reconcile(work.key, cleanup=work.work == "prune")


def test_due_renewals_are_published_not_done_and_the_event_path_does_them(plugin_ca):
    publisher = InMemoryPublisher()
    world = joined_world(plugin_ca, ["r1", "r2"], publisher=publisher)
    before = {n: world.compute.vms[key(n)].metadata[names.CERT_CHAIN_KEY] for n in ("r1", "r2")}
    writes = world.compute.writes
    at(world, LATER)

    summary = world.sweeper.sweep()

    assert world.compute.writes == writes, "the sweep wrote a VM's metadata itself"
    assert summary.counts["published"] == summary.counts["published_renew"] == 2, summary.counts
    assert summary.counts["renewed"] == 0 and summary.counts["publish_failed"] == 0
    assert sorted((m["instance"], m["work"]) for m in publisher.published) == [("r1", "renew"), ("r2", "renew")]
    assert {m["project"] for m in publisher.published} == {PROJECT} and {m["zone"] for m in publisher.published} == {ZONE}
    assert len({m["sweep"] for m in publisher.published}) == 1
    for message in publisher.published:
        work, outcome = deliver(world, message)
        assert (work.work, work.sweep) == ("renew", message["sweep"])
        assert outcome.verb == "renewed", outcome
    for name in ("r1", "r2"):
        assert world.compute.vms[key(name)].metadata[names.CERT_CHAIN_KEY] != before[name]


def test_a_failed_publish_is_that_vms_deferral_and_the_sweep_goes_on(plugin_ca):
    publisher = InMemoryPublisher(fail=lambda m: "PermissionDenied: 403" if m["instance"] == "f1" else None)
    world = joined_world(plugin_ca, ["f1", "f2"], publisher=publisher)
    at(world, LATER)
    summary = world.sweeper.sweep()
    assert summary.counts["publish_failed"] == 1 and summary.counts["deferred"] == 1
    assert summary.counts["published_renew"] == 1 and [m["instance"] for m in publisher.published] == ["f2"]
    # The next sweep plans it again (its certificate is still due).
    publisher._fail = None
    again = world.sweeper.sweep()
    assert again.counts["published"] == 2 and [m["instance"] for m in publisher.published].count("f1") == 1


def test_the_budget_publishes_the_most_urgent_first_and_defers_the_rest(plugin_ca):
    publisher = InMemoryPublisher()
    # A quota so small that a sweep's budget is 2 renewals.
    reads = 2 * capacity.calls_per_work(SETTINGS, capacity.RENEW)[capacity.COMPUTE_READ] / SETTINGS.sweep_work_share / 10
    settings = replace(SETTINGS, compute_reads_per_minute=int(reads) + 1)
    assert capacity.sweep_work_budget(settings) == 2
    world = joined_world(plugin_ca, ["b1", "b2", "b3", "b4"], settings=settings, publisher=publisher)
    at(world, LATER)
    summary = world.sweeper.sweep()
    assert summary.counts["published_renew"] == 2 and summary.counts["deferred"] == 2, summary.counts
    due = [a.key.instance for a in summary.plan.actions]
    assert [m["instance"] for m in publisher.published] == due[:2], "not the earliest due first"


def test_a_lost_vm_is_published_as_prune_and_the_event_path_prunes_it(plugin_ca):
    publisher = InMemoryPublisher()
    world = joined_world(plugin_ca, ["gone", "kept"], publisher=publisher)
    del world.compute.vms[key("gone")]  # deleted without an event
    world.secrets.legacy.add(key("gone"))  # and meshjoin 2's secret of it was left behind
    summary = world.sweeper.sweep()
    assert [(m["instance"], m["work"]) for m in publisher.published] == [("gone", "prune")]
    assert key("gone") not in world.secrets.legacy, "the legacy secret is pruned inline (host project)"
    assert summary.counts["published_prune"] == 1 and summary.counts["pruned"] >= 1
    entries = lambda n: [o for o in world.kube.objects.values() if o["kind"] == "WorkloadEntry"  # noqa: E731
                         and o["metadata"]["annotations"].get(names.ANNOTATION_PREFIX + "instance") == n]
    assert entries("gone"), "the sweep deleted the entry itself"
    work, outcome = deliver(world, publisher.published[0], when=NOW)
    assert work.work == "prune" and outcome.verb == "left"
    assert entries("gone") == [] and len(entries("kept")) == 1


def test_a_forged_prune_for_a_live_labelled_vm_deletes_nothing(plugin_ca):
    world = joined_world(plugin_ca, ["live", "other"])
    def state() -> str:
        objects = {str(k): o for k, o in world.kube.objects.items()}
        return json.dumps([objects, {str(k): dict(v.metadata) for k, v in world.compute.vms.items()}], sort_keys=True)

    snapshot = state()
    for target in ("live", "other"):
        work, outcome = deliver(world, {"project": PROJECT, "zone": ZONE, "instance": target, "work": "prune",
                                        "sweep": "forged-1"}, when=NOW)
        assert work.work == "prune" and outcome.state == "joined", outcome
    assert state() == snapshot


def test_a_forged_prune_removes_only_what_the_vms_own_truth_says_must_go(plugin_ca):
    """Unlabelled with every meshjoin item wiped by its owner: only the hint lets the event path find the
    leftover entry; without it (an audit event) the reconcile sees no trace and leaves it for the sweep."""
    world = joined_world(plugin_ca, ["wiped"])
    current = world.compute.vms[key("wiped")]
    world.compute.vms[key("wiped")] = replace(current, labels={}, metadata={})
    entries = lambda: [o for o in world.kube.objects.values() if o["kind"] == "WorkloadEntry"]  # noqa: E731
    _, outcome = deliver(world, {"project": PROJECT, "zone": ZONE, "instance": "wiped"}, when=NOW)
    assert outcome.verb == "ignored" and len(entries()) == 1
    _, outcome = deliver(world, {"project": PROJECT, "zone": ZONE, "instance": "wiped", "work": "prune"}, when=NOW)
    assert outcome.verb == "left" and entries() == []


def test_dry_run_and_inline_mode_still_work(plugin_ca):
    publisher = InMemoryPublisher()
    world = joined_world(plugin_ca, ["d1"], publisher=publisher)
    at(world, LATER)
    dry = world.sweeper.sweep(dry_run=True)
    assert publisher.published == [] and [a.kind for a in dry.plan.actions] == ["renew"]
    inline = world.sweeper.sweep(inline=True)
    assert publisher.published == [] and inline.counts["renewed"] == 1 and inline.counts["published"] == 0


def test_sweep_ids_are_short_tokens_the_events_function_accepts():
    sweep_id = new_sweep_id(NOW)
    work = decode_work(push({"project": PROJECT, "zone": ZONE, "instance": "a", "work": "join", "sweep": sweep_id},
                            NOW), now=NOW, max_age=timedelta(hours=1))
    assert work.sweep == sweep_id and len(sweep_id) <= 64 and new_sweep_id(NOW) != sweep_id


# --- the adapter's handling of futures (its client replaced; no network) -----------------------------

class _Future:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, timeout=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Client:
    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.sent = []

    def publish(self, topic, data, timeout=None):
        self.sent.append((topic, json.loads(data), timeout))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, ValueError):
            raise outcome  # refused at once by the client
        return _Future(outcome)


def test_the_adapter_reports_each_failure_and_timeout_as_that_messages_result():
    settings = replace(SETTINGS, events_topic=f"projects/{PROJECT}/topics/meshjoin-events")
    publisher = PubSubPublisher(settings, credentials=None)
    from google.api_core.exceptions import PermissionDenied

    client = _Client(["m-1", PermissionDenied("pubsub.topics.publish"), FutureTimeout(), ValueError("too large"), "m-5"])
    publisher._client = client  # the cached client, replaced: nothing leaves the process
    messages = [{"project": PROJECT, "zone": ZONE, "instance": f"v{i}", "work": "renew", "sweep": "s"} for i in range(5)]
    results = publisher.publish(messages, timeout=3)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert results[0].message_id == "m-1" and "PermissionDenied" in results[1].error
    assert "no answer" in results[2].error and "too large" in results[3].error
    assert [s[0] for s in client.sent] == [settings.events_topic] * 5 and client.sent[0][2] == 3
    assert client.sent[4][1] == messages[4]


def test_the_adapter_needs_a_topic():
    with pytest.raises(ValueError, match="MESHJOIN_EVENTS_TOPIC"):
        PubSubPublisher(SETTINGS, credentials=None)


@pytest.mark.parametrize("hints, cleanup", [({"work": "prune", "sweep": "s-1"}, True),
                                            ({"work": "renew", "sweep": "s-2"}, False), ({}, False)])
def test_the_events_entrypoint_logs_the_hints_and_only_prune_asks_for_cleanup(monkeypatch, caplog, hints, cleanup):
    from types import SimpleNamespace

    from meshjoin import entrypoints

    calls = []

    class Recording:
        def reconcile(self, key, cleanup=False):
            calls.append((key, cleanup))
            return SimpleNamespace(verb="renewed", reason="due", state="joined", details={})

    monkeypatch.setattr(entrypoints, "runtime", lambda: SimpleNamespace(settings=SETTINGS, reconciler=Recording()))
    monkeypatch.setattr(entrypoints, "utc_now", lambda: NOW)
    message = {"project": PROJECT, "zone": ZONE, "instance": "e-1", **hints}
    with caplog.at_level("INFO", logger="meshjoin"):
        entrypoints.handle_vm_event(SimpleNamespace(data=push(message, NOW)))
    assert calls == [(key("e-1"), cleanup)]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("renewed")]
    assert {k: record.fields.get(k) for k in ("work", "sweep")} == {"work": hints.get("work"), "sweep": hints.get("sweep")}
