#!/usr/bin/env python3
"""Stage each Cloud Function's source directory: main.py, requirements.txt and the meshjoin package.

Cloud Functions builds a function from one directory holding `main.py` and `requirements.txt`.
The functions import `meshjoin`, which lives in shared/meshjoin and is installed into the local
venv as an editable package that a function build never sees. So each bundle carries a copy of
the package beside its main.py (the build puts the source root on sys.path) and the repository's
runtime pins (requirements.txt; the CLI's extras are in requirements-cli.txt), and nothing else:
no tests, no sandbox, no dev tools, no CLI.

    python3 deploy/package.py [--out build/functions]

writes OUT/events and OUT/maintenance; Terraform (deploy/terraform/functions.tf) zips and uploads
them. Standard library only, so it runs in any build step before a venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "shared" / "meshjoin"
REQUIREMENTS = REPO / "requirements.txt"

# Function directory under functions/ → the entry point its main.py must define.
FUNCTIONS = {"events": "on_vm_event", "maintenance": "on_schedule"}

# Modules of the operator CLI only: they import click and rich, which the runtime does not install
# (tests/deploy/test_package.py checks no bundled module imports a CLI-only package).
CLI_ONLY = ("cli.py",)

# Build leftovers, the CLI, and anything that is not the product's own source or data.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*.egg-info", *CLI_ONLY)

# For `gcloud functions deploy --source OUT/<name>`: upload the bundle and nothing accidental.
GCLOUDIGNORE = """\
# Written by deploy/package.py: the bundle is exactly main.py, requirements.txt and meshjoin/
# (without the CLI).
.gcloudignore
__pycache__/
*.pyc
tests/
"""

_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


class PackagingError(Exception):
    pass


def check_requirements(text: str) -> None:
    """The build installs from this file alone: every line must be an exact pin of a package.

    `-r other.txt` or `-e ../lib` would name files the bundle does not carry, and an unpinned
    line would let a rebuild pick up a release nobody tested.
    """
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line and not _PIN.match(line):
            problems.append(f"requirements.txt:{number}: {raw.strip()!r} is not a `name==version` pin")
    if problems:
        raise PackagingError("\n".join(problems))


def package_function(name: str, entry_point: str, out: Path, requirements: str) -> Path:
    source = REPO / "functions" / name / "main.py"
    main = source.read_text()
    if not re.search(rf"^def {entry_point}\(", main, re.MULTILINE):
        raise PackagingError(f"{source.relative_to(REPO)} does not define the entry point {entry_point}()")
    target = out / name
    if target.exists():
        shutil.rmtree(target)  # a file deleted from the package must not survive in the bundle
    target.mkdir(parents=True)
    (target / "main.py").write_text(main)
    (target / "requirements.txt").write_text(requirements)
    shutil.copytree(PACKAGE, target / "meshjoin", ignore=IGNORED)
    (target / ".gcloudignore").write_text(GCLOUDIGNORE)
    normalise_modes(target)
    return target


def normalise_modes(root: Path) -> None:
    """Same bytes and modes from any checkout (umask), so the zip and its hash only change with content."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def content_hash(root: Path) -> str:
    """Short hash over relative paths and contents: equal bundles, equal hash (for the log line)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def package(out: Path) -> dict[str, Path]:
    requirements = REQUIREMENTS.read_text()
    check_requirements(requirements)
    out.mkdir(parents=True, exist_ok=True)
    # Keep the staged copies out of git without touching the repository's .gitignore.
    (out / ".gitignore").write_text("# Written by deploy/package.py: build output.\n*\n")
    return {name: package_function(name, entry, out, requirements) for name, entry in FUNCTIONS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "functions",
                        help="where to write one directory per function (default: build/functions)")
    args = parser.parse_args(argv)
    try:
        bundles = package(args.out)
    except PackagingError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    for name, path in bundles.items():
        files = sum(1 for p in path.rglob("*") if p.is_file())
        print(f"package: {name}: {path} ({files} files, content {content_hash(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
