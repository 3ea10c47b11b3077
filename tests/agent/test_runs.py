"""Whole runs: the boot installs the watcher (a copy of itself) and converges; a second run with nothing new
changes nothing at all; a withdrawn bootstrap makes the VM leave the mesh; the script still converges when piped
into bash (no file to install as the watcher)."""

from __future__ import annotations

from .harness import AGENT, PROXY_UID, mode_and_owner


def test_the_boot_installs_itself_as_the_watcher(vm):
    run = vm.boot()
    assert run.returncode == 0
    agent = vm.file("usr/local/sbin/meshjoin-agent")
    assert agent.read_bytes() == AGENT.read_bytes() and mode_and_owner(agent) == (0o755, 0, 0)
    unit = vm.file("etc/systemd/system/meshjoin-watch.service").read_text()
    assert "ExecStart=/usr/local/sbin/meshjoin-agent watch\n" in unit and "Restart=always\n" in unit
    assert vm.calls("systemctl")[:3] == ["daemon-reload", "enable meshjoin-watch.service",
                                         "restart meshjoin-watch.service"]


def test_a_second_run_with_nothing_new_changes_nothing(joined_vm, server):
    """Idempotence: every path under the root keeps its content, mode, owner, inode and mtime; the sidecar is not
    restarted, no package is installed, nothing is written to guest attributes."""
    vm = joined_vm
    before = vm.snapshot()
    systemctl, writes = len(vm.calls("systemctl")), len(server.guest_writes())
    run = vm.boot()
    assert run.returncode == 0
    assert vm.snapshot() == before
    calls = [call for call in vm.calls("systemctl")[systemctl:] if not call.startswith("is-")]
    assert calls == ["enable meshjoin-watch.service", "start meshjoin-watch.service", "enable istio.service",
                     "start istio.service"]  # start of what runs is a no-op for systemd; no restart, no reload
    assert len(server.guest_writes()) == writes and vm.calls("dpkg") == [] and vm.calls("useradd") == []
    owned = sorted(str(p.relative_to(vm.root)) for p in vm.root.rglob("*") if p.stat().st_uid == PROXY_UID)
    assert owned == ["etc/certs/cert-chain.pem", "etc/certs/key.pem", "etc/certs/root-cert.pem"]


def test_leaving_stops_the_sidecar_and_removes_the_identity(joined_vm, server):
    vm = joined_vm
    server.set_instance(meshjoin_cluster_env=None)  # meshjoin withdrew the bootstrap (label removed, denied)
    calls = len(vm.calls("systemctl"))
    run = vm.watch_once()
    assert run.returncode == 0
    for name in ("key.pem", "key.next.pem", "cert-chain.pem"):
        assert not vm.file(f"etc/certs/{name}").exists(), name
    assert [c for c in vm.calls("systemctl")[calls:] if not c.startswith("is-")] == ["stop istio.service",
                                                                                     "disable istio.service"]
    assert "csr" not in server.state.guest and server.state.guest["sidecar"] == "stopped"
    assert server.state.guest["cert-serial"] == ""
    assert any(line.startswith("notice: left the mesh: meshjoin-cluster-env was withdrawn") for line in run.journal)
    assert vm.state("cert-serial") is None and vm.state("csr-key-id") is None


def test_piped_into_bash_it_still_converges_once(vm, server):
    run = vm._run(["bash"], {}, stdin=AGENT.read_text())
    assert run.returncode == 0, run.stderr
    assert any(line.startswith("warning: install the watcher (meshjoin-watch.service) skipped: cannot copy the agent")
               for line in run.journal)
    assert not vm.file("usr/local/sbin/meshjoin-agent").exists()
    assert vm.file("etc/certs/key.next.pem").exists() and server.csr() is not None


def test_an_unknown_argument_prints_the_usage(bare_vm):
    run = bare_vm._run(["bash", str(AGENT), "join-now"], {})
    assert run.returncode == 2 and run.stderr.startswith("usage: ")


def test_a_copied_vm_talks_only_to_its_own_metadata_server(joined_vm, server):
    """The templates' servers are gone: a copy's every request, the nudge included, reaches this test's server."""
    run = joined_vm.boot()  # a boot nudges once, whatever changed
    assert run.returncode == 0 and "info: nudged meshjoin through projects/meshjoin-host/topics/meshjoin-events" in \
        run.journal
    assert server.state.published == [{"project": "tenant-project", "zone": "europe-west1-b", "instance": "vm-1"}]
