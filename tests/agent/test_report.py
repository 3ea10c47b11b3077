"""The report: guest attributes meshjoin reads (agent-version, cert-serial, sidecar, updated), written only when a
value changed; then a nudge on meshjoin's events topic naming this VM. A failed nudge never fails the converge."""

from __future__ import annotations

import re

from .harness import MetadataServer, csr_public_key

SERIAL = 0x00FF00112233445566778899AABBCCDD


def test_the_report_names_the_agent_the_certificate_and_the_sidecar(vm, server, issuer):
    assert vm.boot().returncode == 0
    guest = server.state.guest
    assert (guest["agent-version"], guest["sidecar"]) == ("3", "stopped") and "cert-serial" not in guest
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", guest["updated"])
    server.set_instance(meshjoin_cert_chain=issuer.sign(csr_public_key(server.csr()), serial=SERIAL))
    before = len(server.guest_writes())
    run = vm.watch_once()
    assert run.returncode == 0
    assert (guest["cert-serial"], guest["sidecar"]) == ("ff00112233445566778899aabbccdd", "running")
    assert server.guest_writes()[before:] == ["cert-serial", "sidecar", "updated"]  # only what changed, then when
    assert ("info: reported to meshjoin: agent 3, certificate ff00112233445566778899aabbccdd, sidecar running"
            in run.journal)
    for key in ("agent-version", "cert-serial", "sidecar"):
        assert vm.state(f"reported.{key}") == guest[key]


def test_the_nudge_names_this_vm_on_meshjoins_topic_with_the_vms_token(vm, server):
    run = vm.boot()
    assert run.returncode == 0
    assert server.state.published == [{"project": "tenant-project", "zone": "europe-west1-b", "instance": "vm-1"}]
    (post,) = server.requests("POST")
    assert post.path == "/v1/projects/meshjoin-host/topics/meshjoin-events:publish"
    assert post.headers["Authorization"] == f"Bearer {MetadataServer.TOKEN}"
    assert MetadataServer.TOKEN not in run.stdout + run.stderr + "\n".join(run.journal)  # a header file, not argv


def test_nothing_new_is_not_reported_again(joined_vm, server):
    vm = joined_vm
    writes, posts = len(server.guest_writes()), len(server.requests("POST"))
    run = vm.call("read_attributes; if report; then echo reported; else echo nothing-new; fi")
    assert run.stdout == "nothing-new\n" and len(server.guest_writes()) == writes
    assert vm.watch_once().returncode == 0  # the metadata did not change: the watcher does not converge
    assert len(server.guest_writes()) == writes and len(server.requests("POST")) == posts


def test_a_failed_sidecar_is_reported_as_failed(joined_vm, server):
    vm = joined_vm
    (vm.log / "units" / "istio.service.active").unlink()
    (vm.log / "units" / "istio.service.failed").touch()
    run = vm.call("read_attributes; report; echo \"changed=$?\"")
    assert run.stdout.strip() == "changed=0" and server.state.guest["sidecar"] == "failed"


def test_a_sidecar_that_will_not_start_is_reported_failed_and_the_run_fails(booted_vm, server, issuer):
    vm = booted_vm
    (vm.log / "refuse-restart").touch()
    server.set_instance(meshjoin_cert_chain=issuer.sign(csr_public_key(server.csr())))
    run = vm.watch_once()
    assert run.returncode == 1
    assert server.state.guest["sidecar"] == "failed"  # meshjoin keeps the VM out of traffic
    assert run.journal[-1].startswith("err: start istio.service failed: systemctl restart istio.service: Job for "
                                      "istio.service failed (stub)")
    assert run.journal[-1].endswith("Remedy: journalctl -u istio.service says why")


def test_a_refused_publish_is_a_warning_and_the_join_goes_on(vm, server):
    server.state.publish_status = 403
    run = vm.boot()
    assert run.returncode == 0
    assert any(line.startswith("warning: nudge meshjoin: publishing to projects/meshjoin-host/topics/meshjoin-events "
                               "answered 403 User not authorized to perform this action.") for line in run.journal)
    assert server.state.published == [] and server.csr() is not None


def test_without_guest_attributes_the_report_says_meshjoin_keeps_the_vm_out(vm, server):
    server.state.guest_enabled = False
    run = vm.call('read_attributes; report stopped && c=0 || c=$?; echo "changed=$c retry=$RETRY"')  # the step alone
    assert run.stdout.strip() == "changed=1 retry=1"  # nothing reported; the watcher writes it again soon
    assert any(line.startswith("warning: report to meshjoin (guest attributes): could not write agent-version "
                               "sidecar updated (the metadata server answered 403") and
               line.endswith("until then meshjoin keeps this VM out of mesh traffic") for line in run.journal), \
        run.journal
    assert vm.state("reported.agent-version") is None  # written again next time
