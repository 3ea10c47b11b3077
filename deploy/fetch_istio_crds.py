#!/usr/bin/env python3
"""Recreate ../shared/reference/istio/vm-crds.yaml where the checkout comes without it (Cloud Build).

The sandbox's Kubernetes emulator validates every object against Istio's own CRDs, which the
development machine keeps beside the checkout. A build worker has only the repository, so the
test step fetches istio/api's generated CRDs at the pinned commit and keeps the three VM kinds,
documents unchanged, exactly as the reference file was made.

    python3 deploy/fetch_istio_crds.py --commit SHA --out /shared/reference/istio/vm-crds.yaml

Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.request
from pathlib import Path

SOURCE = "https://raw.githubusercontent.com/istio/api/{commit}/kubernetes/customresourcedefinitions.gen.yaml"
KINDS = ("serviceentries", "workloadentries", "workloadgroups")
_NAME = re.compile(r"^  name: ([a-z]+)\.networking\.istio\.io$", re.MULTILINE)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", required=True, help="istio/api commit (see the reference file's header)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    url = SOURCE.format(commit=args.commit)
    with urllib.request.urlopen(url, timeout=60) as response:
        text = response.read().decode()
    header = (f"# Istio CustomResourceDefinitions for WorkloadEntry, WorkloadGroup and ServiceEntry,\n"
              f"# extracted unchanged from istio/api kubernetes/customresourcedefinitions.gen.yaml\n"
              f"# (commit {args.commit}) by deploy/fetch_istio_crds.py. Apache-2.0, Istio Authors.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + extract(text))
    print(f"fetch_istio_crds: wrote {args.out} from {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
