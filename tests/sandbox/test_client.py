"""The sandbox client shared by the end-to-end tests and the benchmarks (meshjoin_sandbox.client): what it
decodes, how it waits, how it reads a sandbox's state directory and how it would start one. Starting and
stopping a real sandbox through it is what every end-to-end test file does (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshjoin_sandbox import launcher
from meshjoin_sandbox.client import (MESHJOIN, SandboxClient, decode_status, entry_instance, metadata_items,
                                     status_of, up_command, wait_for)
from meshjoin_sandbox.config import PORT_NAMES, SandboxConfig


def instance(**items: str) -> dict:
    """A Compute instance as the REST API returns it, with these metadata items."""
    return {"name": "vm-1", "metadata": {"fingerprint": "abc", "items": [{"key": k, "value": v}
                                                                        for k, v in items.items()]}}


# --- decoding: one place -----------------------------------------------------------------------------


def test_a_status_is_decoded_from_the_vms_metadata():
    status = {"state": "joined", "keyId": "k1", "keyCerts": "1"}
    vm = instance(**{"meshjoin-status": json.dumps(status), "other": "x"})
    assert metadata_items(vm) == {"meshjoin-status": json.dumps(status), "other": "x"}
    assert status_of(vm) == status


def test_no_status_and_no_vm_read_as_empty():
    assert status_of(instance(other="x")) == {}
    assert status_of(None) == {}
    assert metadata_items({"name": "bare"}) == {}
    assert metadata_items({"metadata": {"items": [{"key": "empty"}]}}) == {"empty": ""}  # GCE omits empty values
    assert decode_status("") == {} and decode_status(None) == {}


def test_a_status_that_is_not_json_is_an_error_not_an_empty_status():
    with pytest.raises(ValueError):
        decode_status("{not json")


def test_an_entry_speaks_for_the_vm_its_annotation_names():
    assert entry_instance({"metadata": {"annotations": {"meshjoin.dev/instance": "vm-1"}}}) == "vm-1"
    assert entry_instance({"metadata": {"annotations": None}}) is None  # someone else's entry
    assert entry_instance({"metadata": {}}) is None


# --- waiting --------------------------------------------------------------------------------------------


def test_wait_for_returns_the_first_truthy_value():
    answers = iter([None, 0, {}, {"state": "joined"}, {"state": "never read"}])
    assert wait_for(lambda: next(answers), timeout=30, interval=0) == {"state": "joined"}
    assert next(answers) == {"state": "never read"}  # it stopped polling at the first truthy answer


def test_wait_for_says_what_it_waited_for_and_the_last_answer():
    calls = []

    def not_yet() -> list:
        calls.append(1)
        return []

    with pytest.raises(AssertionError, match=r"waiting for vm-1 joined \(last: \[\]\)"):
        wait_for(not_yet, timeout=0.05, interval=0.01, what="vm-1 joined")
    assert calls, "the predicate was polled"


# --- a state directory, as `sandbox up` writes it --------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    cfg = SandboxConfig(state_dir=str(tmp_path), ports={name: 40000 + i for i, name in enumerate(PORT_NAMES)},
                        sa_token="sa-token", admin_token="admin-token", ca_dir=str(tmp_path / "ca"),
                        kube_ca_file=str(tmp_path / "kube-ca.pem"), kube_cert_file="c", kube_key_file="k",
                        crd_path="crds.yaml", function_env={"MESHJOIN_CERT_TTL": "2m"})
    cfg.save()
    launcher.write_env_file(cfg)
    return tmp_path


def test_the_client_reads_what_sandbox_up_wrote(state_dir):
    client = SandboxClient(state_dir)
    assert (client.project, client.zone) == ("meshjoin-sandbox", "us-central1-a")
    assert client.config["ports"]["compute"] == client.cfg.ports["compute"]
    assert client.url("control") == f"http://127.0.0.1:{client.cfg.ports['control']}"
    assert client.env_vars["MESHJOIN_CERT_TTL"] == "2m"
    assert client.env_vars["MESHJOIN_COMPUTE_ENDPOINT"] == client.url("compute")
    assert client.ca_file("root-cert.pem") == state_dir / "ca" / "root-cert.pem"
    assert client.log_path("maintenance_fn") == state_dir / "logs" / "maintenance_fn.log"
    assert client.http.headers["Authorization"] == "Bearer admin-token"


def test_a_function_process_gets_the_sandboxs_settings_not_the_callers(state_dir, monkeypatch):
    monkeypatch.setenv("MESHJOIN_PROJECT", "someone-elses")
    monkeypatch.setenv("MESHJOIN_ONLY_MINE", "1")
    monkeypatch.setenv("PATH_LIKE_THING", "kept")
    client = SandboxClient(state_dir)
    env = client.process_env()
    assert env["MESHJOIN_PROJECT"] == "meshjoin-sandbox" and "MESHJOIN_ONLY_MINE" not in env
    assert env["PATH_LIKE_THING"] == "kept"
    # What a person gets after `source DIR/env` keeps their own variables beside the sandbox's.
    assert client.env["MESHJOIN_ONLY_MINE"] == "1" and client.env["MESHJOIN_PROJECT"] == "meshjoin-sandbox"


def test_the_functions_logs_are_read_as_json_lines(state_dir):
    (state_dir / "logs").mkdir()
    (state_dir / "logs" / "events_fn.log").write_text(
        'plain startup line\n{"instance": "vm-1", "outcome": "registered"}\n'
        '{"instance": "vm-2", "outcome": "registered"}\n{"instance": "vm-1", "outcome": "bootstrapped"}\n')
    client = SandboxClient(state_dir)
    assert [e["outcome"] for e in client.function_log()] == ["registered", "registered", "bootstrapped"]
    assert client.logged("vm-1", "registered") == [{"instance": "vm-1", "outcome": "registered"}]
    assert "plain startup line" in client.raw_logs()


def test_request_counts_are_named_by_api_and_the_control_plane_is_left_out(state_dir):
    client = SandboxClient(state_dir)
    client.control = lambda method, path, body=None: {
        "compute": {"instances.get": 3}, "kube": {"get workloadentries": 2}, "control": {"stats": 9}}
    assert client.stats() == {"compute instances.get": 3, "kubernetes get workloadentries": 2}


# --- starting ------------------------------------------------------------------------------------------


def test_the_cli_start_passes_each_function_setting_and_the_extra_arguments(tmp_path):
    argv = up_command(tmp_path, {"A": "1", "B": "x=y"}, ("--project", "p=1"))
    assert argv == [MESHJOIN, "sandbox", "up", "--state-dir", str(tmp_path), "--function-env", "A=1",
                    "--function-env", "B=x=y", "--project", "p=1"]


@pytest.mark.parametrize("options", [{"compute_subnet": "10.0.0.0/16"}, {"run_startup_scripts": False}])
def test_what_the_cli_cannot_do_is_refused_before_anything_starts(tmp_path, options):
    with pytest.raises(ValueError, match="in_process=True"):
        SandboxClient.start(tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


def test_cli_arguments_are_refused_in_process(tmp_path):
    with pytest.raises(ValueError, match="CLI arguments"):
        SandboxClient.start(tmp_path, in_process=True, up_args=("--project", "p=1"))
    assert list(tmp_path.iterdir()) == []


def test_a_failing_sandbox_up_is_an_error_with_its_output(tmp_path):
    """The CLI refuses an unknown option before it starts anything; the client says so, with the CLI's words."""
    with pytest.raises(launcher.SandboxError, match="(?i)no such option"):
        SandboxClient.start(tmp_path / "never", up_args=("--no-such-option",))
    assert not (tmp_path / "never" / "pids.json").exists()
