"""deploy/package.py: each function's bundle is main.py + requirements.txt + meshjoin/, and it is
self-contained: imported with the editable install and the repository out of reach, every module
and every import statement in it (lazy ones included) resolves, and only to distributions that
its own requirements.txt pulls in. tests/deploy/test_bundle_serves.py then proves the same in a
fresh venv, serving real requests."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from .conftest import REPO, load_deploy_script

package = load_deploy_script("package")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("functions")
    return package.package(out)


def source_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def test_each_bundle_is_main_requirements_and_the_package(bundles):
    assert set(bundles) == set(package.FUNCTIONS) == {"events", "maintenance"}
    product = REPO / "shared" / "meshjoin"
    for name, bundle in bundles.items():
        top = sorted(p.name for p in bundle.iterdir())
        assert top == [".gcloudignore", "main.py", "meshjoin", "requirements.txt"], name
        assert (bundle / "main.py").read_text() == (REPO / "functions" / name / "main.py").read_text()
        assert (bundle / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
        # Every file of the product (templates too) but the CLI, nothing else: no caches, tests or sandbox.
        runtime = [f for f in source_files(product) if f not in package.CLI_ONLY]
        assert source_files(bundle / "meshjoin") == runtime
        assert "cli.py" not in runtime
        for relative in runtime:
            assert (bundle / "meshjoin" / relative).read_bytes() == (product / relative).read_bytes()


def test_packaging_is_repeatable(bundles, tmp_path):
    again = package.package(tmp_path)
    for name in bundles:
        assert package.content_hash(again[name]) == package.content_hash(bundles[name])
        modes = {p.stat().st_mode & 0o777 for p in again[name].rglob("*") if p.is_file()}
        assert modes == {0o644}


def test_build_output_stays_out_of_git(bundles):
    out = next(iter(bundles.values())).parent
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"


@pytest.mark.parametrize("line, ok", [
    ("functions-framework==3.10.2", True),
    ("google-cloud-compute==1.56.0  # comment", True),
    ("# just a comment", True),
    ("", True),
    ("uvicorn[standard]==0.30.0", True),
    ("-r requirements-dev.txt", False),
    ("-e ../common-lib", False),
    ("cryptography>=42", False),
    ("jinja2", False),
    ("meshjoin @ file:./meshjoin", False),
])
def test_requirements_must_be_exact_pins(line, ok):
    if ok:
        package.check_requirements(line)
    else:
        with pytest.raises(package.PackagingError):
            package.check_requirements(line)


def test_the_repository_requirements_pass():
    package.check_requirements((REPO / "requirements.txt").read_text())


def requirement_names(path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0).lower())
    return names


def test_runtime_requirements_leave_the_cli_and_sandbox_out():
    """The functions install requirements.txt: no terminal UI; the Pub/Sub client, since the sweep
    publishes its per-VM work to the events topic (issue 16)."""
    runtime = requirement_names(REPO / "requirements.txt")
    cli = requirement_names(REPO / "requirements-cli.txt")
    assert {"click", "rich"} & runtime == set() and "google-cloud-pubsub" in runtime
    assert {"click", "rich"} <= cli and not cli & runtime
    assert "-r requirements.txt" in (REPO / "requirements-cli.txt").read_text()
    assert "-r requirements-cli.txt" in (REPO / "requirements-dev.txt").read_text()
    # make installs all of it (dev includes cli includes runtime) and rebuilds when any changes.
    makefile = (REPO / "Makefile").read_text()
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.MULTILINE).group(1)
    assert {"requirements.txt", "requirements-cli.txt", "requirements-dev.txt"} <= set(stamp_rule.split())


def test_only_the_cli_modules_import_cli_packages():
    """CLI_ONLY is complete: every module importing click or rich is left out of the bundle."""
    importing = set()
    for path in (REPO / "shared" / "meshjoin").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m.split(".")[0] in ("click", "rich") for m in modules):
                importing.add(path.relative_to(REPO / "shared" / "meshjoin").as_posix())
    assert importing == set(package.CLI_ONLY)


def test_missing_entry_point_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(package.FUNCTIONS, "events", "no_such_handler")
    with pytest.raises(package.PackagingError, match="no_such_handler"):
        package.package(tmp_path)


# Runs in a child interpreter (this venv's): hide the editable install and the checkout, refuse
# any top-level import outside the bundle's requirements closure, then import everything.
ISOLATED_IMPORT = r'''
import ast, importlib, importlib.abc, importlib.metadata as md, json, pkgutil, re, sys
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

bundle, repo = Path(sys.argv[1]), sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
checkout = [f"{repo}/{d}" for d in ("shared", "sandbox", "functions", "tests")]
sys.path[:] = [str(bundle)] + [p for p in sys.path
                               if p and p != repo and not any(p == c or p.startswith(c + "/") for c in checkout)]
sys.path_importer_cache.clear()

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

closure, todo = set(), []
for line in (bundle / "requirements.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
        todo.append(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))
while todo:
    name = canonical(todo.pop())
    if name in closure:
        continue
    closure.add(name)
    for text in md.distribution(name).requires or []:
        requirement = Requirement(text)
        # Extras and other Pythons' backports are not installed by the build.
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)

owners = md.packages_distributions()
def allowed(top):
    """Installed distributions may provide a name only if in the closure; the rest is stdlib."""
    if top in ("meshjoin", "main"):
        return True  # the bundle's own (the editable install's dist is not in the closure)
    return top not in owners or any(canonical(d) in closure for d in owners[top])

class OutsideTheBundle(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        top = fullname.partition(".")[0]
        if not allowed(top):
            raise ModuleNotFoundError(f"{fullname}: not provided by the bundle or its requirements")
        return None

sys.meta_path.insert(0, OutsideTheBundle())

import main
import meshjoin
assert Path(meshjoin.__file__).is_relative_to(bundle), meshjoin.__file__
modules = ["meshjoin"] + [m.name for m in pkgutil.walk_packages(meshjoin.__path__, "meshjoin.")]
for module in modules:
    importlib.import_module(module)

# Every import statement anywhere in the bundle, including the lazy ones inside functions.
imported = set()
for path in [bundle / "main.py", *sorted((bundle / "meshjoin").rglob("*.py"))]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module)
for module in sorted(imported):
    importlib.import_module(module)
print(json.dumps({"entry": [n for n in ("on_vm_event", "on_schedule") if hasattr(main, n)],
                  "modules": len(modules), "imports": len(imported)}))
'''


@pytest.mark.parametrize("name", sorted(package.FUNCTIONS))
def test_bundle_imports_without_the_repository(bundles, name, tmp_path):
    result = subprocess.run([sys.executable, "-c", ISOLATED_IMPORT, str(bundles[name]), str(REPO)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["entry"] == [package.FUNCTIONS[name]]
    assert report["modules"] > 10 and report["imports"] > 10
