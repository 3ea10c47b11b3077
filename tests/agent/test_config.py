"""Rendering cluster.env, the mesh config and /etc/hosts from meshjoin's items: exactly the lines meshjoin wrote,
root's files (istio-start.sh sources cluster.env as root), and one meshjoin block in /etc/hosts however often the
agent runs."""

from __future__ import annotations

from .harness import mode_and_owner

ENV = "var/lib/istio/envoy/cluster.env"
MESH = "etc/istio/config/mesh"
STOCK_HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
BEGIN = "# BEGIN meshjoin (istiod; rewritten by the meshjoin agent)"
END = "# END meshjoin"


def test_cluster_env_is_this_vms_lines_then_the_deployments_and_the_mesh_config_is_the_item(vm, server):
    assert vm.boot().returncode == 0
    instance, project = server.state.instance, server.state.project
    assert vm.file(ENV).read_text() == instance["meshjoin-cluster-env"] + project["meshjoin-mesh-env"]
    assert vm.file(MESH).read_text() == project["meshjoin-mesh-config"]
    for path in (ENV, MESH):
        assert mode_and_owner(vm.file(path)) == (0o644, 0, 0), path
    for directory in ("var/lib/istio", "var/lib/istio/envoy", "etc/istio", "etc/istio/config"):
        assert mode_and_owner(vm.file(directory)) == (0o755, 0, 0), directory
    assert mode_and_owner(vm.file("var/lib/meshjoin")) == (0o700, 0, 0)


def test_an_instance_mesh_env_replaces_the_projects(vm, server):
    server.set_instance(meshjoin_mesh_env="ISTIO_META_NETWORK=vm-network\n")
    assert vm.call("lock; read_attributes; write_config").returncode == 0  # the step alone
    assert vm.file(ENV).read_text() == server.state.instance["meshjoin-cluster-env"] + "ISTIO_META_NETWORK=vm-network\n"


def test_a_changed_item_rewrites_the_file_and_restarts_the_sidecar(joined_vm, server):
    vm = joined_vm
    calls = len(vm.calls("systemctl"))
    server.set_instance(meshjoin_cluster_env=server.state.instance["meshjoin-cluster-env"] + "EXTRA_LINE=1\n")
    assert vm.watch_once().returncode == 0
    assert "EXTRA_LINE=1\n" in vm.file(ENV).read_text()
    assert "restart istio.service" in vm.calls("systemctl")[calls:]  # istio-agent reads cluster.env at start only


def write_hosts(vm):
    return vm.call("read_attributes; write_hosts")


def test_hosts_keeps_the_images_lines_and_holds_one_meshjoin_block(vm, server):
    assert vm.boot().returncode == 0  # the whole boot, then the step alone (write_hosts)
    hosts = server.state.project["meshjoin-hosts"]
    assert hosts == "10.128.0.9 istiod.istio-system.svc\n"
    assert vm.file("etc/hosts").read_text() == f"{STOCK_HOSTS}{BEGIN}\n{hosts}{END}\n"
    assert mode_and_owner(vm.file("etc/hosts")) == (0o644, 0, 0)

    assert write_hosts(vm).returncode == 0  # again: the same file, not a second block
    assert vm.file("etc/hosts").read_text() == f"{STOCK_HOSTS}{BEGIN}\n{hosts}{END}\n"

    with vm.file("etc/hosts").open("a") as f:
        f.write("192.168.1.5 printer\n")  # the owner's own line, after the block
    server.set_instance(meshjoin_hosts="10.128.0.10 istiod.istio-system.svc istiod\n10.128.0.11 other")
    assert write_hosts(vm).returncode == 0  # the block replaced, the last line given its newline
    assert vm.file("etc/hosts").read_text() == (f"{STOCK_HOSTS}192.168.1.5 printer\n{BEGIN}\n"
                                                "10.128.0.10 istiod.istio-system.svc istiod\n10.128.0.11 other\n"
                                                f"{END}\n")

    server.set_instance(meshjoin_hosts=None)
    server.set_project(meshjoin_hosts=None)
    assert write_hosts(vm).returncode == 0  # no istiod address: no block, the rest kept
    assert vm.file("etc/hosts").read_text() == f"{STOCK_HOSTS}192.168.1.5 printer\n"


def test_a_missing_cluster_env_at_boot_stops_with_the_reason_to_look_for(vm, server):
    server.set_instance(meshjoin_cluster_env=None)
    run = vm.boot()
    assert run.returncode == 1
    # The step named is the one that ran last (leave_mesh, which found nothing to remove).
    assert "info: no meshjoin-cluster-env in metadata and no identity in place: nothing to remove" in run.journal
    assert run.journal[-1] == ("err: leave the mesh failed: no meshjoin-cluster-env in this VM's metadata. "
                               "Remedy: label the VM mesh=join; its meshjoin-status metadata item says why it has "
                               "not joined")
    assert not vm.file(ENV).exists() and not vm.file("etc/certs/key.next.pem").exists()
