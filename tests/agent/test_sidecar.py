"""The sidecar package: installed only when its SHA-256 is the one configured, once per package; a stock image's
baked-in istio-sidecar is kept when no URL is configured."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

VERSION = "1.24.1-meshjoin-test"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> bytes:
    """A tiny istio-sidecar.deb packed with dpkg-deb (the stubbed dpkg records the install)."""
    if shutil.which("dpkg-deb") is None:  # a broken image in CI, as in tests/e2e
        (pytest.fail if os.environ.get("CI") else pytest.skip)("not installed: dpkg-deb")
    work = tmp_path_factory.mktemp("deb")
    (work / "pkg" / "DEBIAN").mkdir(parents=True)
    (work / "pkg" / "DEBIAN" / "control").write_text(
        f"Package: istio-sidecar\nVersion: {VERSION}\nArchitecture: all\n"
        "Maintainer: meshjoin tests <tests@example.invalid>\nDescription: stand-in for Istio's VM sidecar\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(work / "pkg"), str(work / "sidecar.deb")],
                   check=True, capture_output=True)
    return (work / "sidecar.deb").read_bytes()


def test_a_verified_package_is_installed_once(vm, server, package):
    server.state.files["istio-sidecar.deb"] = package
    server.set_project(meshjoin_sidecar_url=f"http://{server.host}/files/istio-sidecar.deb",
                       meshjoin_sidecar_sha256=hashlib.sha256(package).hexdigest().upper())  # either case
    run = vm.boot()
    assert run.returncode == 0, run.journal
    assert [call.split()[0] for call in vm.calls("dpkg")] == ["-i"]
    assert f"notice: installed istio-sidecar {VERSION} (sha256 verified)" in run.journal
    assert vm.state("sidecar.sha256") == hashlib.sha256(package).hexdigest()

    run = vm.boot()
    assert run.returncode == 0 and len(vm.calls("dpkg")) == 1
    assert len(server.requests("GET", "/files/")) == 1  # not downloaded again
    assert f"info: istio-sidecar {VERSION} already installed from this package; download skipped" in run.journal


@pytest.mark.parametrize("sha, said", [
    ("0" * 64, "checksum mismatch for {url}: expected sha256 " + "0" * 64 + ", got {got}; nothing was installed"),
    ("", "no valid SHA-256 for {url}: refusing to install an unverified package"),
], ids=["mismatch", "missing"])
def test_a_package_that_does_not_match_its_checksum_is_never_installed(vm, server, package, sha, said):
    url = f"http://{server.host}/files/istio-sidecar.deb"
    server.state.files["istio-sidecar.deb"] = package
    server.set_project(meshjoin_sidecar_url=url, meshjoin_sidecar_sha256=sha or None)
    run = vm.boot()
    assert run.returncode == 1 and vm.calls("dpkg") == []
    expected = "err: install the Istio sidecar package failed: " + said.format(
        url=url, got=hashlib.sha256(package).hexdigest())
    assert run.journal[-1].startswith(expected), run.journal[-1]
    assert not any("istio.service" in call for call in vm.calls("systemctl"))


def test_without_a_url_the_images_sidecar_is_kept(vm):
    run = vm.boot()
    assert "info: istio-sidecar 1.24.0-image kept (no package URL configured)" in run.journal
    assert vm.calls("dpkg") == []
