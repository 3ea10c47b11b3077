"""Reading meshjoin's metadata items: the instance's first, then the project's; a malformed item is refused with
one clear log line that names the step, the item and the remedy, and nothing of the VM's identity is touched."""

from __future__ import annotations

import pytest

from meshjoin import names

from .harness import AGENT


def test_sourcing_the_agent_runs_nothing(bare_vm, server):
    """The main guard: a test (or an operator) can source the file to call one function."""
    run = bare_vm.call('printf "%s" "$AGENT_VERSION"')
    assert run.returncode == 0 and run.stdout == "3"
    assert server.state.requests == [] and run.journal == []
    assert sorted(str(p.relative_to(bare_vm.root)) for p in bare_vm.root.rglob("*")) == ["etc", "etc/hosts"]


def test_the_item_names_are_meshjoins(bare_vm):
    """The agent's keys equal meshjoin/names.py's: the deployment's items, and every item it reads per VM."""
    run = bare_vm.call('printf "%s\\n" "${DEPLOYMENT_KEYS[@]}"; echo --; printf "%s\\n" "$KEY_CLUSTER_ENV" '
                       '"$KEY_ROOT_CERT" "$KEY_CERT_CHAIN" "$KEY_REKEY"')
    deployment, per_vm = run.stdout.split("--\n")
    assert tuple(deployment.split()) == names.DEPLOYMENT_KEYS
    assert per_vm.split() == [names.CLUSTER_ENV_KEY, names.ROOT_CERT_KEY, names.CERT_CHAIN_KEY, names.REKEY_KEY]


def test_an_instance_item_wins_over_the_projects_and_the_project_fills_in(bare_vm, server):
    server.set_project(meshjoin_hosts="10.0.0.1 istiod.project\n", meshjoin_mesh_config='{"from":"project"}\n',
                       meshjoin_key_algorithm="rsa-2048")
    server.set_instance(meshjoin_hosts="10.0.0.2 istiod.instance\n", meshjoin_key_algorithm="ecdsa-p256")
    run = bare_vm.call('read_attributes; for k in meshjoin-hosts meshjoin-mesh-config meshjoin-key-algorithm; do '
                       'printf "%s=[%s]\\n" "$k" "$(md "$k")"; done; printf "etag=%s\\n" "$MD_ETAG"')
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["meshjoin-hosts=[10.0.0.2 istiod.instance]",
                                       'meshjoin-mesh-config=[{"from":"project"}]',
                                       "meshjoin-key-algorithm=[ecdsa-p256]", f"etag={server.etag()}"]
    # One snapshot of each, the instance's first (its ETag is the one the watcher waits on).
    reads = [r.path for r in server.requests("GET")]
    assert reads == ["/computeMetadata/v1/instance/attributes/?recursive=true&alt=json",
                     "/computeMetadata/v1/project/attributes/?recursive=true&alt=json"]
    assert all(r.headers.get("Metadata-Flavor") == "Google" for r in server.state.requests)


def test_an_item_is_taken_byte_for_byte(bare_vm, server):
    """No trailing newline added or removed, no shell expansion of what the VM owner (or anyone) wrote."""
    value = "A=1\nB='$(reboot)' `id` $HOME\n\n"
    server.set_instance(meshjoin_cluster_env=value)
    run = bare_vm.call('read_attributes; cat "$WORK/md/meshjoin-cluster-env"')
    assert run.stdout == value


def test_per_vm_items_are_never_taken_from_project_metadata(bare_vm, server, issuer):
    """The certificate, the rekey token, the root and cluster.env are this VM's own: a project item of the same
    key (which every VM of the project would share) is ignored."""
    server.set_project(meshjoin_cluster_env="A=1\n", meshjoin_cert_chain=issuer.root_pem, meshjoin_rekey="r1",
                       meshjoin_root_cert=issuer.root_pem)
    run = bare_vm.call('read_attributes; ls -A "$WORK/md"; echo end')
    assert run.stdout == "end\n"


def test_the_watcher_waits_on_the_instance_etag(bare_vm, server):
    server.set_instance(meshjoin_hosts="10.0.0.2 istiod\n")
    etag = server.etag()
    run = bare_vm.call(f'read_attributes "&wait_for_change=true&last_etag={etag}&timeout_sec=0"; echo "$MD_ETAG"')
    assert run.stdout.strip() == etag
    assert server.requests("GET")[0].path.endswith(f"&wait_for_change=true&last_etag={etag}&timeout_sec=0")


ATTRIBUTES = "/computeMetadata/v1/instance/attributes/"
METADATA_REMEDY = "Remedy: run on a GCE VM, or point GCE_METADATA_HOST at a metadata server"


@pytest.mark.parametrize("path, answer, said", [
    (ATTRIBUTES, (200, b"<html>captive portal</html>"),
     "read meshjoin's metadata failed: the metadata server's answer is not JSON"),
    (ATTRIBUTES, (200, b'["a list"]'), "read meshjoin's metadata failed: the metadata server's answer is not a JSON "
                                       "object"),
    ("/computeMetadata/v1/project/attributes/", (200, b"{"),
     "read meshjoin's metadata failed: the metadata server's answer is not JSON"),
    (ATTRIBUTES, (404, b"not here"), "read meshjoin's metadata failed: the metadata server answered 404 for "
                                     "instance/attributes/?recursive=true&alt=json"),
    ("/computeMetadata/v1/instance/id", (200, b"12ab"),
     "check this VM's instance id failed: the metadata server's instance/id is not a number"),
], ids=["not-json", "not-an-object", "project-not-json", "no-metadata-server", "instance-id"])
def test_a_bad_metadata_answer_stops_the_boot_with_a_clear_line(vm, server, path, answer, said):
    server.state.answers[path] = answer
    run = vm.boot()
    assert run.returncode == 1
    assert run.journal[-1].startswith(f"err: {said}") and run.journal[-1].endswith(METADATA_REMEDY), run.journal
    assert f"meshjoin err: {said}" in run.stderr  # the serial console says it too
    assert not vm.file("etc/certs/key.next.pem").exists() and server.csr() is None


REISSUE = "Remedy: an operator runs 'meshjoin join THIS_VM'"


@pytest.mark.parametrize("item, value, said", [
    ("meshjoin-key-algorithm", "ed25519",
     "make this VM's key failed: metadata item meshjoin-key-algorithm names no key algorithm this agent makes "
     "(ecdsa-p256, rsa-2048). Remedy: set meshjoin's Terraform variable key_algorithm"),
    ("meshjoin-cluster-env", "ISTIO_META_X=1\nrm -rf /\n",
     f"write cluster.env and the mesh config failed: metadata item meshjoin-cluster-env holds a line that is not "
     f"NAME=value. {REISSUE}"),
    ("meshjoin-mesh-env", "TRUST_DOMAIN=cluster.local\n$(reboot)\n",
     f"write cluster.env and the mesh config failed: metadata item meshjoin-mesh-env holds a line that is not "
     f"NAME=value. {REISSUE}"),
    ("meshjoin-mesh-config", None,
     "write cluster.env and the mesh config failed: metadata item meshjoin-mesh-config is missing from the "
     "project's metadata (and the instance's). Remedy: an operator applies meshjoin's Terraform"),
    ("meshjoin-hosts", "10.0.0.9 istiod; curl evil\n",
     "write istiod's address into /etc/hosts failed: metadata item meshjoin-hosts holds a line that is not "
     "'ADDRESS NAME'. Remedy: fix meshjoin's Terraform variables istiod_ip and istiod_address"),
    ("meshjoin-root-cert", "not a certificate",
     f"install the workload certificate failed: metadata item meshjoin-root-cert holds no certificate. {REISSUE}"),
], ids=["key-algorithm", "cluster-env", "mesh-env", "mesh-config-missing", "hosts", "root-cert"])
def test_a_malformed_item_is_refused_with_a_clear_line_and_nothing_of_it_is_written(vm, server, item, value, said):
    for where in (server.state.project, server.state.instance):
        where.pop(item, None)
    if value is not None:
        server.state.instance[item] = value  # the instance's item wins: the VM owner's (or a broken deployment's)
    run = vm.boot()
    assert run.returncode == 1
    assert run.journal[-1].startswith(f"err: {said}"), run.journal
    # Refused before anything of it was written: no file under the root holds any line of it.
    for line in (value or "").splitlines():
        assert not [p for p in vm.root.rglob("*") if p.is_file() and line.encode() in p.read_bytes()], line
    assert not any("istio.service" in call for call in vm.calls("systemctl"))


def test_a_malformed_rekey_token_is_ignored_with_a_warning(booted_vm, server):
    vm = booted_vm
    key = vm.key_pem("key.next.pem")
    server.set_instance(meshjoin_rekey="new key please; rm -rf /")
    run = vm.boot()
    assert run.returncode == 0
    assert ("warning: metadata item meshjoin-rekey is not a token of 1-64 characters [A-Za-z0-9._-]: ignored"
            in run.journal)
    assert vm.key_pem("key.next.pem") == key and vm.state("rekey") is None


@pytest.mark.parametrize("items", [
    {"meshjoin-events-topic": "projects/p/topics/t\nHost: evil"},
    {"meshjoin-events-topic": "projects/meshjoin-host/topics/meshjoin-events", "meshjoin-pubsub-endpoint": "file:///etc"},
], ids=["topic", "endpoint"])
def test_a_malformed_nudge_target_skips_the_nudge(vm, server, items):
    server.state.instance.update(items)
    run = vm.call("read_attributes; nudge")  # the step alone
    assert run.returncode == 0
    assert run.journal == ["warning: nudge meshjoin skipped: meshjoin-events-topic or meshjoin-pubsub-endpoint is "
                           "malformed; meshjoin's sweep reads the report"]
    assert server.requests("POST") == [] and not server.requests("GET", "/token")


def test_the_agent_file_is_the_one_meshjoin_ships():
    from meshjoin import bootstrap

    assert AGENT.read_text() == bootstrap.agent_text()
