"""The Terraform providers' real schemas, offline, from the npm packages cdktf generates from them.

`terraform validate` needs the provider binaries, which cannot be downloaded here. The packages
`@cdktf/provider-<name>` are generated from each provider's own schema (`terraform providers
schema -json`) and name the provider version in their package.json (`cdktf.provider.version`).
For every resource and data source, `lib/<kebab-name>/index.js` holds:

- `synthesizeHclAttributes()` of the resource class and one `<struct>ToHclTerraform(struct)` per
  nested block: every argument and nested block by its Terraform name, `isBlock` true/false, and
  for a block the function that renders its contents (so the nesting is explicit);
- a `reset<Arg>()` method for every OPTIONAL argument or block (in the resource class, and in the
  `<Struct>OutputReference` class of a nested block): an argument without one is required;
- a getter without a setter for every computed-only attribute: it is never among the arguments.

Installing: `npm pack` (or, without npm, a plain HTTPS download from the registry) fetches each
package's tarball (30-35 MB for google/google-beta, 11 MB for kubernetes; 330 MB each unpacked,
which is why nothing is `npm install`ed) into a temporary directory, checked against the pinned
integrity; only the `lib/<name>/index.js` files the configuration
needs, and package.json, are extracted into a cache keyed by package and version
(`~/.cache/meshjoin/cdktf/<package>@<version>/`, or $MESHJOIN_CDKTF_CACHE), and the tarball is
deleted. A later run that finds every needed file in the cache does no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Terraform provider → (npm package, package version, provider version that package was generated
# from). versions.tf pins exactly these provider versions (tests/deploy/test_provider_schemas.py).
PACKAGES = {
    "google": ("@cdktf/provider-google", "16.12.1", "6.50.0"),
    "google-beta": ("@cdktf/provider-google-beta", "16.12.1", "6.50.0"),
    "kubernetes": ("@cdktf/provider-kubernetes", "12.1.1", "2.38.0"),
    "archive": ("@cdktf/provider-archive", "11.0.1", "2.7.1"),
}
# The registry's own integrity of each tarball (`npm view PACKAGE@VERSION dist.integrity`): what
# is checked is exactly what was reviewed, whichever way it was fetched.
INTEGRITY = {
    "@cdktf/provider-google": "sha512-KqNA/5RiFT07r0PSZ6/07cJ2zESUgbj1JchVj21iBFBZVUbD+578xA/k8eq/r0cbyEgLmg9eYWeVslaYah4DCQ==",
    "@cdktf/provider-google-beta": "sha512-ip0dXu0ZrsyMgcoGNfkJCYG8PFjNtfb2wkz4Sw7IU09rQMK/A6++SwkmFHl8wJ8KlwMvd2w4tNXfErIbWWWqag==",
    "@cdktf/provider-kubernetes": "sha512-faZ/zydCsDBYwXqq3douhxSf8KFJfTUixYDr5hg0uCA8FExRK3+w27JUrt6gAVHFBuOVsKthObdqtTmP3PzQSQ==",
    "@cdktf/provider-archive": "sha512-2Plwhj1hVUOYmQrxNbBvy2nrw/gyHZKnQFauPCwjhQX+MpRImF7cceKgX8zZgBPvB5YEP75MIFPbr4sjxDWeHw==",
}

# Arguments and blocks Terraform itself handles in every resource / data source.
META_ARGUMENTS = {"count", "for_each", "depends_on", "provider", "lifecycle", "provisioner", "connection"}


def cache_root() -> Path:
    configured = os.environ.get("MESHJOIN_CDKTF_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "meshjoin" / "cdktf"


class SchemaUnavailable(Exception):
    """npm is missing or the registry unreachable, and the cache lacks a needed file."""


def provider_of(type_name: str) -> str:
    """google_x → google, kubernetes_x → kubernetes, archive_file → archive (the provider's local name)."""
    return type_name.split("_", 1)[0]


def lib_dirs(type_name: str, data: bool) -> list[str]:
    """Where cdktf may have put a type: google_pubsub_subscription → pubsub-subscription, data
    google_project → data-google-project; a name that would clash keeps its prefix
    (google_project_service_identity → google-project-service-identity). The file's own
    `tfResourceType` decides which candidate is the type."""
    if type_name in PACKAGES:  # a provider's own configuration block
        return ["provider"]
    rest = type_name.split("_", 1)[1]
    if data:
        return [("data-" + type_name).replace("_", "-")]
    return [rest.replace("_", "-"), type_name.replace("_", "-")]


def _cached(root: Path, kind: str, type_name: str) -> Path:
    return root / "types" / kind / f"{type_name}.js"


def ensure_files(provider: str, types: set[tuple[str, str]]) -> Path:
    """Cache directory of `provider`'s package holding package.json and the index.js of each
    (kind, type) in `types` (kind: "resource" or "data"), fetching the package if any is missing."""
    package, version, _ = PACKAGES[provider]
    root = cache_root() / f"{package.replace('/', '+')}@{version}"
    missing = {t for t in types if not _cached(root, *t).is_file()}
    if not missing and (root / "package.json").is_file():
        return root
    candidates = {f"package/lib/{d}/index.js": t for t in missing for d in lib_dirs(t[1], t[0] == "data")}
    with tempfile.TemporaryDirectory() as tmp:
        tarball = fetch_tarball(package, version, Path(tmp))
        staging = Path(tmp) / "extract"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers()
                       if m.isfile() and (m.name in candidates or m.name == "package/package.json")]
            archive.extractall(staging, members=members, filter="data")
        root.mkdir(parents=True, exist_ok=True)
        for name, (kind, type_name) in candidates.items():
            path = staging / name
            if path.is_file() and f'.tfResourceType = "{type_name}";' in path.read_text():
                target = _cached(root, kind, type_name)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)  # whole files only: a killed run leaves none half-written
        os.replace(staging / "package" / "package.json", root / "package.json")
    still = sorted(t for t in types if not _cached(root, *t).is_file())
    if still:
        # Not a download problem: the provider has no such type (a typo, or a beta-only type).
        raise KeyError(f"{package}@{version} has no {still}")
    return root


def fetch_tarball(package: str, version: str, directory: Path) -> Path:
    """The package's tarball in `directory`, by `npm pack` (npm's registry and proxy settings) or,
    without npm, straight from the registry over HTTPS; either way checked against INTEGRITY."""
    npm = shutil.which("npm")
    if npm is not None:
        result = subprocess.run([npm, "pack", "--silent", f"{package}@{version}"], cwd=directory,
                                capture_output=True, text=True, timeout=600)
        tarballs = list(directory.glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise SchemaUnavailable(f"npm pack {package}@{version} failed: {result.stderr.strip()[-500:]}")
        tarball = tarballs[0]
    else:
        registry = os.environ.get("npm_config_registry", "https://registry.npmjs.org").rstrip("/")
        url = f"{registry}/{package}/-/{package.split('/')[-1]}-{version}.tgz"
        tarball = directory / "package.tgz"
        try:
            with urllib.request.urlopen(url, timeout=300) as response, tarball.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise SchemaUnavailable(f"no npm, and {url} is unreachable: {exc}") from exc
    digest = hashlib.sha512()
    with tarball.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    integrity = "sha512-" + base64.b64encode(digest.digest()).decode()
    if integrity != INTEGRITY[package]:
        raise AssertionError(f"{package}@{version}: tarball integrity {integrity} is not the pinned {INTEGRITY[package]}")
    return tarball


def provider_version(root: Path) -> str:
    return json.loads((root / "package.json").read_text())["cdktf"]["provider"]["version"]


@dataclass
class Block:
    """One schema level: its arguments (name → required?) and nested blocks (name → (Block, required?))."""
    arguments: dict[str, bool] = field(default_factory=dict)
    blocks: dict[str, tuple["Block", bool]] = field(default_factory=dict)
    computed: set[str] = field(default_factory=set)  # readable attributes that cannot be set


_ENTRY = re.compile(
    r"^\s{8,12}(\w+): \{\s*value: (.*?),\s*isBlock: (true|false),\s*type: \"(\w+)\",\s*storageClassType: \"\w+\",?\s*\}",
    re.MULTILINE | re.DOTALL)
_NESTED_FN = re.compile(r"(\w+)ToHclTerraform\b")
_CAMEL = re.compile(r"(?:struct\.|this\._)(\w+)")


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _class_body(js: str, class_name: str) -> str | None:
    match = re.search(rf"^class {class_name} extends [\w.]+ \{{\n(.*?)^\}}\n", js, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def _entries(body: str) -> list[tuple[str, str, bool, str | None]]:
    """(terraform name, camel name, is block, nested function) for each entry of an attrs literal."""
    out = []
    for name, value, is_block, _type in _ENTRY.findall(body):
        camel = _CAMEL.search(value)
        nested = [n for n in _NESTED_FN.findall(value) if not n.startswith("cdktf.")]
        nested = [n for n in nested if n[0].islower() and not re.fullmatch(r"(string|number|boolean|list|hash)\w*", n)]
        out.append((name, camel.group(1) if camel else name, is_block == "true", nested[-1] if nested else None))
    return out


def _optional(body: str | None) -> set[str] | None:
    if body is None:
        return None
    return {name[0].lower() + name[1:] for name in re.findall(r"^    reset(\w+)\(\) \{", body, re.MULTILINE)}


def _getters(body: str | None) -> set[str]:
    if body is None:
        return set()
    return set(re.findall(r"^    get (\w+)\(\) \{", body, re.MULTILINE)) - {"internalValue"}


def parse(js: str) -> Block:
    """The schema of the one resource or data source defined in `js` (an index.js)."""
    functions = dict(re.findall(r"^function (\w+)ToHclTerraform\(struct\) \{\n(.*?)^\}\n", js, re.MULTILINE | re.DOTALL))
    top_class = re.search(r"^class (\w+) extends cdktf\.Terraform(?:Resource|DataSource|Provider) \{", js, re.MULTILINE).group(1)
    top_body = _class_body(js, top_class)
    top_attrs = re.search(r"synthesizeHclAttributes\(\) \{\n(.*?)\n    \}\n", top_body, re.DOTALL).group(1)

    def build(attrs_text: str, class_body: str | None, depth: int = 0) -> Block:
        block = Block()
        optional = _optional(class_body)
        settable = set()
        for name, camel, is_block, nested in _entries(attrs_text):
            settable.add(camel)
            required = optional is not None and camel not in optional
            if is_block and nested and nested in functions and depth < 12:
                struct = nested[0].upper() + nested[1:]
                child = build(functions[nested], _class_body(js, f"{struct}OutputReference"), depth + 1)
                block.blocks[name] = (child, required)
            elif is_block:
                block.blocks[name] = (Block(), required)
            else:
                block.arguments[name] = required
        block.computed = {_snake(g) for g in _getters(class_body) - settable
                          if not g.endswith("Input") and _snake(g) not in block.arguments and _snake(g) not in block.blocks}
        return block

    return build(top_attrs, top_body)


def provider_schema(name: str) -> Block:
    """The arguments of a `provider "<name>" { ... }` block."""
    root = ensure_files(name, {("provider", name)})
    return parse(_cached(root, "provider", name).read_text())


def schema(type_name: str, data: bool = False, provider: str | None = None) -> Block:
    """`provider`: the provider's local name when the block selects one (`provider = google-beta`)."""
    provider = provider or provider_of(type_name)
    kind = "data" if data else "resource"
    root = ensure_files(provider, {(kind, type_name)})
    return parse(_cached(root, kind, type_name).read_text())
