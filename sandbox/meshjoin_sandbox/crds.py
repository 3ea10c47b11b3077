"""Istio's CRD schemas for the Kubernetes emulator: the copy this package carries, and its refresh.

The emulator validates every WorkloadEntry, WorkloadGroup and ServiceEntry against Istio's own
CustomResourceDefinitions (storage version v1, structural schema and CEL rules). They ship inside
this package (`data/istio-vm-crds.yaml`, Apache-2.0, provenance in its header), so a fresh clone,
a fork's CI or Cloud Build needs nothing beside the checkout and nothing from the network.

`istio_crds_path()` is the one way in. Maintainers refresh the copy from a given istio/api commit:

    python -m meshjoin_sandbox.crds --commit SHA

That is the only code that downloads it; no build or test step does.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.resources import files
from pathlib import Path

DATA_FILE = "istio-vm-crds.yaml"
UPSTREAM_REPO = "istio/api"
UPSTREAM_PATH = "kubernetes/customresourcedefinitions.gen.yaml"
SOURCE = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
KINDS = ("serviceentries", "workloadentries", "workloadgroups")
_NAME = re.compile(r"^  name: ([a-z]+)\.networking\.istio\.io$", re.MULTILINE)
_COMMIT = re.compile(r"^# Commit: +([0-9a-f]{40})", re.MULTILINE)

HEADER = """\
# Istio CustomResourceDefinitions for WorkloadEntry, WorkloadGroup and ServiceEntry: the schemas the
# sandbox's Kubernetes emulator validates every object against (structural schema + CEL rules).
#
# Upstream:  https://github.com/{repo}  ({repo})
# Path:      {path}
# Commit:    {commit}{when}
# Licence:   Apache License 2.0, Copyright Istio Authors (http://www.apache.org/licenses/LICENSE-2.0)
# Extracted: the three CRD documents below, unchanged and in upstream order.
# Refresh:   python -m meshjoin_sandbox.crds --commit SHA   (maintainers only; nothing downloads it at build time)
"""


def istio_crds_path() -> Path:
    """The CRD file this package carries (a real file: the emulator and tests open it by path)."""
    return Path(str(files("meshjoin_sandbox") / "data" / DATA_FILE))


def istio_crds_commit(path: Path | None = None) -> str:
    """The istio/api commit the carried CRDs come from, as its header names it."""
    text = (path or istio_crds_path()).read_text(encoding="utf-8")[:2000]
    match = _COMMIT.search(text)
    if match is None:
        raise ValueError(f"{path or istio_crds_path()}: no '# Commit:' line in the header")
    return match.group(1)


def extract(text: str) -> str:
    """The CRD documents of the VM kinds, verbatim, in their original order."""
    docs = re.split(r"^---\s*$", text, flags=re.MULTILINE)
    kept = []
    for doc in docs:
        match = _NAME.search(doc)
        if match and match.group(1) in KINDS and "kind: CustomResourceDefinition" in doc:
            kept.append(doc.strip("\n"))
    found = sorted(_NAME.search(doc).group(1) for doc in kept)
    if found != sorted(KINDS):
        raise ValueError(f"expected the CRDs of {', '.join(KINDS)}, found {', '.join(found) or 'none'}")
    return "\n---\n".join(kept) + "\n"


def render(upstream_text: str, commit: str, when: str = "") -> str:
    """The data file: provenance header, then the extracted documents."""
    header = HEADER.format(repo=UPSTREAM_REPO, path=UPSTREAM_PATH, commit=commit,
                           when=f" ({when})" if when else "")
    return header + extract(upstream_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refresh the Istio CRDs this package carries.")
    parser.add_argument("--commit", required=True, help="istio/api commit (40 hex digits)")
    parser.add_argument("--date", default="", help="the commit's date, recorded in the header")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's data file")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        parser.error("--commit must be a full 40-digit commit id")
    import urllib.request

    url = SOURCE.format(repo=UPSTREAM_REPO, commit=args.commit, path=UPSTREAM_PATH)
    with urllib.request.urlopen(url, timeout=60) as response:
        text = response.read().decode()
    out = args.out or istio_crds_path()
    out.write_text(render(text, args.commit, args.date), encoding="utf-8")
    print(f"crds: wrote {out} from {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
