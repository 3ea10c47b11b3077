"""deploy/upload_ca.py against CAs made by the sandbox and a fake `gcloud` on PATH that records
every call and keeps secrets in a JSON file: nothing real is ever called."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from meshjoin_sandbox.ca import make_plugin_ca, make_rotated_ca

from meshjoin import pki

from .conftest import load_deploy_script

upload_ca = load_deploy_script("upload_ca")

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """Fake gcloud: records argv, keeps secrets (name -> list of versions) in a JSON file."""
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if os.environ.get("FAKE_GCLOUD_FAIL") and os.environ["FAKE_GCLOUD_FAIL"] in " ".join(args):
        sys.exit("ERROR: (gcloud) injected failure")
    path = os.environ["FAKE_GCLOUD_STATE"]
    state = json.load(open(path)) if os.path.exists(path) else {{}}
    words = [a for a in args if not a.startswith("--")]
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert flags.get("project"), "every call must name the project"
    if words[:2] == ["secrets", "describe"]:
        sys.exit(0 if words[2] in state else 1)
    elif words[:2] == ["secrets", "create"]:
        state[words[2]] = []
    elif words[:3] == ["secrets", "versions", "access"]:
        versions = state.get(flags["secret"])
        if not versions:
            sys.exit(1)
        sys.stdout.write(versions[-1])
    elif words[:3] == ["secrets", "versions", "add"]:
        state[words[3]].append(open(flags["data-file"]).read())
    else:
        sys.exit("fake gcloud: unexpected call " + " ".join(args))
    json.dump(state, open(path, "w"))
''')


class FakeGcloud:
    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "gcloud.log"
        self.state_file = root / "state.json"
        script = self.bin / "gcloud"
        script.write_text(FAKE_GCLOUD.format(python=sys.executable))
        script.chmod(0o755)

    @property
    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def verbs(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if [a for a in c if not a.startswith("--")][:len(prefix)] == list(prefix)]

    @property
    def secrets(self) -> dict[str, list[str]]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}


@pytest.fixture
def gcloud(tmp_path, monkeypatch) -> FakeGcloud:
    fake = FakeGcloud(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(fake.state_file))
    for name in ("MESHJOIN_CA_CERT_SECRET", "MESHJOIN_CA_KEY_SECRET", "MESHJOIN_CA_CHAIN_SECRET",
                 "MESHJOIN_CA_ROOT_SECRET", "MESHJOIN_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.fixture(scope="module")
def good_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    make_plugin_ca(directory)
    (directory / "root-key.pem").unlink()  # a real cacerts directory has no root key
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("other-ca")
    make_plugin_ca(directory, root_name="another root")
    return directory


def mixed(tmp_path: Path, base: Path, **replacements: Path) -> Path:
    """A copy of `base` with some files taken from elsewhere (`ca_key=other / "ca-key.pem"`)."""
    directory = tmp_path / "mixed"
    shutil.copytree(base, directory)
    for attribute, source in replacements.items():
        shutil.copy(source, directory / attribute.replace("_", "-").replace("-pem", ".pem"))
    return directory


DEFAULT_SECRETS = {"istio-ca-cert": "ca-cert.pem", "istio-ca-key": "ca-key.pem",
                   "istio-cert-chain": "cert-chain.pem", "istio-root-cert": "root-cert.pem"}


def test_a_good_ca_is_uploaded_into_the_four_secrets(gcloud, good_ca, capsys):
    assert upload_ca.main(["--project", "my-proj", str(good_ca)]) == 0
    secrets = gcloud.secrets
    assert set(secrets) == set(DEFAULT_SECRETS)
    for secret, filename in DEFAULT_SECRETS.items():
        assert secrets[secret] == [(good_ca / filename).read_text()]
    # Created unlabelled for pruning: managed-by=meshjoin marks per-VM secrets only.
    for call in gcloud.verbs("secrets", "create"):
        assert "--labels=meshjoin-role=plugin-ca" in call and not any("managed-by" in a for a in call)
    # The root is trusted before anything signed under it is served.
    added = [[a for a in c if not a.startswith("--")][3] for c in gcloud.verbs("secrets", "versions", "add")]
    assert added == ["istio-root-cert", "istio-cert-chain", "istio-ca-key", "istio-ca-cert"]
    assert all("--project=my-proj" in call for call in gcloud.calls)
    # What was uploaded is what the functions accept.
    pki.load_ca_bundle(*(secrets[s][-1].encode() for s in
                         ("istio-ca-cert", "istio-ca-key", "istio-cert-chain", "istio-root-cert")))
    assert "4 new version(s)" in capsys.readouterr().out


def test_uploading_the_same_ca_again_adds_nothing(gcloud, good_ca, capsys):
    assert upload_ca.main(["--project", "my-proj", str(good_ca)]) == 0
    assert upload_ca.main(["--project", "my-proj", str(good_ca)]) == 0
    assert len(gcloud.verbs("secrets", "versions", "add")) == 4
    assert all(len(versions) == 1 for versions in gcloud.secrets.values())
    assert "0 new version(s)" in capsys.readouterr().out


def test_a_rotated_ca_adds_versions_and_keeps_both_roots(gcloud, good_ca, tmp_path):
    assert upload_ca.main(["--project", "my-proj", str(good_ca)]) == 0
    rotated = tmp_path / "rotated"
    make_rotated_ca(rotated, good_ca)
    assert upload_ca.main(["--project", "my-proj", str(rotated)]) == 0
    assert all(len(versions) == 2 for versions in gcloud.secrets.values())
    assert gcloud.secrets["istio-root-cert"][-1].count("BEGIN CERTIFICATE") == 2


def test_secret_names_come_from_flags_or_the_functions_settings(gcloud, good_ca, monkeypatch):
    monkeypatch.setenv("MESHJOIN_CA_KEY_SECRET", "mesh-ca-key")
    monkeypatch.setenv("MESHJOIN_PROJECT", "env-proj")
    assert upload_ca.main([str(good_ca), "--cert-secret", "mesh-ca-cert"]) == 0
    assert set(gcloud.secrets) == {"mesh-ca-cert", "mesh-ca-key", "istio-cert-chain", "istio-root-cert"}
    assert all("--project=env-proj" in call for call in gcloud.calls)


@pytest.mark.parametrize("case, replace, reason", [
    ("key of another CA", {"ca_key_pem": "ca-key.pem"}, "ca-key.pem does not match"),
    ("chain ending in another root", {"root_cert_pem": "root-cert.pem"}, "not a root in root-cert.pem"),
    ("chain of another CA", {"cert_chain_pem": "cert-chain.pem"}, "cert-chain.pem is broken"),
    ("cert of another CA", {"ca_cert_pem": "ca-cert.pem"}, "ca-key.pem does not match"),
])
def test_a_mismatched_directory_is_refused_before_any_call(gcloud, good_ca, other_ca, tmp_path, capsys,
                                                          case, replace, reason):
    directory = mixed(tmp_path, good_ca, **{attr: other_ca / name for attr, name in replace.items()})
    assert upload_ca.main(["--project", "my-proj", str(directory)]) == 2, case
    err = capsys.readouterr().err
    assert "refused, nothing uploaded" in err and reason in err, err
    assert gcloud.calls == []


def test_a_root_that_is_not_self_signed_is_refused(gcloud, good_ca, tmp_path, capsys):
    directory = mixed(tmp_path, good_ca)
    (directory / "root-cert.pem").write_text((good_ca / "ca-cert.pem").read_text())  # the intermediate
    assert upload_ca.main(["--project", "my-proj", str(directory)]) == 2
    assert "is not a self-signed root" in capsys.readouterr().err
    assert gcloud.calls == []


def test_an_expired_ca_is_refused(gcloud, tmp_path, capsys):
    directory = tmp_path / "old"
    make_plugin_ca(directory, now=datetime.now(timezone.utc) - timedelta(days=30),
                   intermediate_validity=timedelta(days=10))
    assert upload_ca.main(["--project", "my-proj", str(directory)]) == 2
    assert "ca-cert.pem expired" in capsys.readouterr().err
    assert gcloud.calls == []


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "ca-key.pem").unlink(), "missing ca-key.pem"),
    (lambda d: (d / "ca-key.pem").write_text("not a key"), "not an unencrypted PEM private key"),
    (lambda d: (d / "root-cert.pem").write_text(""), "root-cert.pem holds no certificate"),
    (lambda d: (d / "ca-cert.pem").write_text((d / "cert-chain.pem").read_text()), "exactly one certificate"),
])
def test_a_damaged_directory_is_refused(gcloud, good_ca, tmp_path, capsys, damage, reason):
    directory = mixed(tmp_path, good_ca)
    damage(directory)
    assert upload_ca.main(["--project", "my-proj", str(directory)]) == 2
    assert reason in capsys.readouterr().err
    assert gcloud.calls == []


def test_dry_run_checks_and_calls_nothing(gcloud, good_ca, capsys):
    assert upload_ca.main(["--project", "my-proj", "--dry-run", str(good_ca)]) == 0
    assert gcloud.calls == []
    assert "would upload ca-key.pem to projects/my-proj/secrets/istio-ca-key" in capsys.readouterr().out


def test_a_failing_gcloud_call_fails_the_upload(gcloud, good_ca, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GCLOUD_FAIL", "versions add istio-ca-key")
    assert upload_ca.main(["--project", "my-proj", str(good_ca)]) == 1
    assert "injected failure" in capsys.readouterr().err
    # Stopped at the key: the cert that belongs to it was not uploaded without it.
    assert "istio-ca-cert" not in gcloud.secrets


def test_a_project_is_required(gcloud, good_ca, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    with pytest.raises(SystemExit):
        upload_ca.main([str(good_ca)])
    assert gcloud.calls == []
