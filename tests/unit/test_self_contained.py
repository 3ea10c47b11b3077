"""The checkout is the whole project: no tracked file reads from beside it or names a machine's path.

The team's machines keep reference material next to the checkout (`../shared`); a user's clone, a
fork's CI and Cloud Build have nothing there. What the project needs from it is copied in with its
provenance (e.g. `meshjoin_sandbox/data/istio-vm-crds.yaml`). This test scans every tracked file
of the product, the sandbox, the tests, the benchmarks, deploy/, the Makefile, `.ci/` and
`cloudbuild.yaml`, and fails on the first such reference.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("shared", "functions", "sandbox", "tests", "bench", "deploy", ".ci", "Makefile", "cloudbuild.yaml")
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()

# Reaching beside the checkout: `../shared`, `REPO.parent / "shared"`, the reference folder by name.
_BESIDE = re.compile(r"""\.\./shared\b|\.parent\s*/\s*["']shared["']|reference/istio|["']reference["']\s*/\s*["']istio""")
# An absolute path of somebody's machine: under /work, /home, /root, /Users or /mnt.
_MACHINE_PATH = re.compile(r"(?<![A-Za-z0-9_.\-])/(?:work|home|root|Users|mnt)/")
# `Path(__file__).parents[N]` / `.parent.parent...` that climb above the repository root.
_PARENTS_INDEX = re.compile(r"__file__\)?(?:\.resolve\(\))?\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"__file__\)?(?:\.resolve\(\))?((?:\.parent\b)+)")


def offences(path: str, text: str) -> list[str]:
    """What in `text` (the content of the tracked file at repo-relative `path`) leaves the checkout."""
    found = []
    depth = len(Path(path).parts) - 1  # Path(__file__).parents[depth] is the repository root
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in ((_BESIDE, "reads from beside the checkout"), (_MACHINE_PATH, "names a machine path")):
            match = pattern.search(line)
            if match:
                found.append(f"{path}:{number}: {what}: {match.group(0)!r}")
        for match in _PARENTS_INDEX.finditer(line):
            if int(match.group(1)) > depth:
                found.append(f"{path}:{number}: climbs above the repository: {match.group(0)!r}")
        for match in _PARENT_CHAIN.finditer(line):
            if match.group(1).count(".parent") > depth + 1:
                found.append(f"{path}:{number}: climbs above the repository: {match.group(0)!r}")
    return found


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *SCANNED], cwd=REPO, capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0") if name and name != THIS_FILE]


def test_no_tracked_file_reaches_outside_the_checkout():
    files = tracked_files()
    assert len(files) > 50, "git ls-files found too little: is this a checkout?"
    problems = []
    for name in files:
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the work tree
        problems += offences(name, text)
    assert problems == [], "\n".join(problems)


# The planted references below are assembled from pieces, so that a repository-wide grep for such
# paths (as a reviewer or a hook runs it) finds none in this file.
WORK = "/" + "work/"


@pytest.mark.parametrize("path, line", [
    ("sandbox/meshjoin_sandbox/launcher.py", 'path = REPO.parent / "shared" / "reference" / "istio" / "vm-crds.yaml"'),
    ("tests/sandbox/test_kube.py", 'CRD_PATH = "' + WORK + 'shared/reference/istio/vm-crds.yaml"'),
    ("tests/unit/test_bootstrap.py", 'CRDS = Path(__file__).resolve().parents[3] / "shared" / "x.yaml"'),
    ("tests/unit/test_bootstrap.py", "HERE = Path(__file__).parent.parent.parent.parent"),
    ("cloudbuild.yaml", "python3 fetch.py --out /shared/" + "reference/istio/vm-crds.yaml"),
    ("Makefile", "\tcp ../shared/DESIGN.md docs/"),
    (".ci/run", "source /home/dev/env.sh"),
    ("tests/deploy/test_package.py", '("meshjoin @ file://' + WORK + 'main", False),'),
    ("bench/world.py", "ROOT = '/root/meshjoin'"),
])
def test_the_guard_catches_each_kind_of_reference(path, line):
    assert offences(path, line), f"{line!r} in {path} should be refused"


@pytest.mark.parametrize("path, line", [
    ("tests/e2e/conftest.py", "REPO = Path(__file__).resolve().parents[2]"),
    ("bench/sweep.py", "REPO = Path(__file__).resolve().parents[1]"),
    ("deploy/package.py", 'SHARED = REPO / "shared"'),
    ("sandbox/meshjoin_sandbox/metadata.py", 'url = "http://metadata.google.internal/computeMetadata/v1/"'),
    ("shared/meshjoin/agent/meshjoin-agent.sh", "install -d /var/lib/istio/envoy /etc/certs"),
    ("README.md", "see https://github.com/istio/api/blob/master/README.md"),
])
def test_the_guard_allows_paths_inside_the_checkout_and_the_vm(path, line):
    assert offences(path, line) == []
