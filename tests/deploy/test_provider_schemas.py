"""Every resource and data source in deploy/terraform against the providers' real schemas, offline.

The schemas come from the cdktf npm packages generated from the providers (provider_schemas.py:
installed on first use into a cache, then offline). For each block: no unknown argument or block,
blocks written as blocks and arguments as arguments at the right depth, every required argument
and block present, no computed-only attribute set; and every `type.name.attribute` the
configuration reads exists. versions.tf pins exactly the provider versions checked here.
"""

from __future__ import annotations

import re

import pytest

from . import provider_schemas as ps
from .conftest import TF_DIR


def parse_explicit() -> list[tuple[str, str, str, dict, str]]:
    """(kind, type, name, body, file) for every resource and data block; blocks marked __is_block__."""
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(with_comments=False, explicit_blocks=True, preserve_heredocs=False,
                                   strip_string_quotes=True)
    found = []
    for path in sorted(TF_DIR.glob("*.tf")):
        with path.open() as f:
            document = hcl2.load(f, serialization_options=options)
        for kind in ("resource", "data"):
            for block in document.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        found.append((kind, rtype, name, body, path.name))
    return found


def provider_name(body: dict, rtype: str) -> str:
    """The provider a block uses: its `provider = google-beta` meta-argument, else its type's prefix."""
    chosen = body.get("provider")
    if chosen:
        return str(chosen).strip("${}").split(".")[0]
    return ps.provider_of(rtype)


def is_block(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get("__is_block__") for v in value)


def check(body: dict, schema: ps.Block, where: str, top: bool = True) -> list[str]:
    """Problems of one block body against its schema (recursively)."""
    problems = []
    present = set()
    for key, value in body.items():
        if key == "__is_block__" or (top and key in ps.META_ARGUMENTS):
            continue
        if key == "dynamic":
            for item in value:
                for name, dynamic in item.items():
                    present.add(name)
                    if name not in schema.blocks:
                        problems.append(f"{where}: dynamic \"{name}\" is not a block of this type")
                        continue
                    for content in dynamic.get("content", []):
                        problems += check(content, schema.blocks[name][0], f"{where}.{name}", top=False)
            continue
        present.add(key)
        if key in schema.blocks:
            if not is_block(value):
                problems.append(f"{where}: {key} is a block, written as an argument (`{key} = ...`)")
                continue
            for item in value:
                problems += check(item, schema.blocks[key][0], f"{where}.{key}", top=False)
        elif key in schema.arguments:
            if is_block(value):
                problems.append(f"{where}: {key} is an argument, written as a block (`{key} {{ ... }}`)")
        elif key in schema.computed:
            problems.append(f"{where}: {key} is computed by the provider and cannot be set")
        else:
            problems.append(f"{where}: unknown argument or block {key!r}")
    for name, required in schema.arguments.items():
        if required and name not in present:
            problems.append(f"{where}: required argument {name!r} is missing")
    for name, (_, required) in schema.blocks.items():
        if required and name not in present:
            problems.append(f"{where}: required block {name!r} is missing")
    return problems


@pytest.fixture(scope="module")
def configuration():
    return parse_explicit()


@pytest.fixture(scope="module")
def schemas(configuration):
    """(kind, type, provider) → Block, downloading what the cache lacks (one `npm pack` per provider)."""
    needed: dict[str, set[tuple[str, str]]] = {}
    for kind, rtype, _, body, _ in configuration:
        needed.setdefault(provider_name(body, rtype), set()).add((kind, rtype))
    for provider in provider_blocks():
        needed.setdefault(provider, set()).add(("provider", provider))
    try:
        for provider, dirs in needed.items():
            ps.ensure_files(provider, dirs)
    except ps.SchemaUnavailable as exc:
        pytest.skip(f"provider schemas unavailable offline and not cached: {exc}")
    return {(kind, rtype, provider_name(body, rtype)): ps.schema(rtype, kind == "data", provider_name(body, rtype))
            for kind, rtype, _, body, _ in configuration}


def test_every_block_matches_its_providers_schema(configuration, schemas):
    problems = []
    for kind, rtype, name, body, filename in configuration:
        schema = schemas[(kind, rtype, provider_name(body, rtype))]
        prefix = "data." if kind == "data" else ""
        problems += check(body, schema, f"{filename}: {prefix}{rtype}.{name}")
    assert problems == [], "\n".join(problems)


def provider_blocks() -> dict[str, dict]:
    """name → body of every `provider "<name>" { ... }` block."""
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(with_comments=False, explicit_blocks=True, strip_string_quotes=True)
    found = {}
    for path in sorted(TF_DIR.glob("*.tf")):
        with path.open() as f:
            for block in hcl2.load(f, serialization_options=options).get("provider", []):
                found.update(block)
    return found


def test_provider_configurations_match_their_schemas(schemas):
    blocks = provider_blocks()
    assert {"google", "google-beta", "kubernetes"} <= set(blocks)
    kubernetes = ps.provider_schema("kubernetes")
    assert {"host", "token", "cluster_ca_certificate"} <= set(kubernetes.arguments) and "exec" in kubernetes.blocks
    problems = []
    for name, body in blocks.items():
        problems += check(body, ps.provider_schema(name), f'provider "{name}"')
    assert problems == [], "\n".join(problems)


# `type.name.attribute` / `data.type.name.attribute`, with an optional [key] after the name.
_READ = re.compile(r"(?<![.\w])(data\.)?((?:google|kubernetes|archive)_[a-z0-9_]+)\.([a-z0-9_]+)(?:\[[^\]]*\])?\.([a-z0-9_]+)")


def test_every_attribute_read_exists(configuration, schemas):
    by_address = {(kind, rtype, name): (kind, rtype, provider_name(body, rtype)) for kind, rtype, name, body, _ in configuration}
    text = "\n".join(re.sub(r"#.*", "", p.read_text()) for p in sorted(TF_DIR.glob("*.tf")))
    problems = []
    for data, rtype, name, attribute in _READ.findall(text):
        key = by_address.get(("data" if data else "resource", rtype, name))
        assert key, f"{data}{rtype}.{name} is read but not declared"
        schema = schemas[key]
        if attribute not in schema.arguments and attribute not in schema.blocks and attribute not in schema.computed:
            problems.append(f"{data}{rtype}.{name}.{attribute}: no such attribute")
    assert problems == [], "\n".join(problems)


def test_versions_tf_pins_exactly_the_checked_provider_versions(configuration, schemas):
    versions = (TF_DIR / "versions.tf").read_text()
    pinned = dict(re.findall(r'(\S+)\s*=\s*\{\s*source\s*=\s*"hashicorp/[\w-]+"\s*version\s*=\s*"([^"]+)"', versions))
    used = {provider for _, _, provider in schemas}
    assert used <= set(pinned), f"providers used but not pinned: {used - set(pinned)}"
    for provider, version in pinned.items():
        assert provider in ps.PACKAGES, f"{provider} is not schema-checked"
        package, package_version, provider_version = ps.PACKAGES[provider]
        assert version == provider_version, f"{provider}: versions.tf pins {version}, the checked schema is {provider_version}"
        root = ps.ensure_files(provider, set())
        # The package's own record of the provider it was generated from: the table cannot drift.
        assert ps.provider_version(root) == provider_version, f"{package}@{package_version}"


# --- the checker itself can fail --------------------------------------------------------------

BROKEN = '''
resource "google_pubsub_subscription" "broken" {
  name      = "x"
  colour    = "blue"
  effective_labels = {}
  retry_policy = { minimum_backoff = "10s" }
  push_config {
    oidc_token {
      service_account_email = "a@b"
    }
    no_such_block {
      x = 1
    }
  }
  dead_letter_policy {
    retry_policy {
      minimum_backoff = "10s"
    }
  }
}
'''


def test_the_checker_finds_each_kind_of_mistake(schemas, tmp_path):
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(with_comments=False, explicit_blocks=True, strip_string_quotes=True)
    body = hcl2.loads(BROKEN, serialization_options=options)["resource"][0]["google_pubsub_subscription"]["broken"]
    problems = check(body, ps.schema("google_pubsub_subscription"), "broken")
    text = "\n".join(problems)
    assert "unknown argument or block 'colour'" in text
    assert "effective_labels is computed by the provider" in text
    assert "retry_policy is a block, written as an argument" in text
    assert "broken.push_config: unknown argument or block 'no_such_block'" in text
    assert "broken.dead_letter_policy: unknown argument or block 'retry_policy'" in text  # wrong nesting
    assert "required argument 'topic' is missing" in text
    assert "broken.push_config: required argument 'push_endpoint' is missing" in text
    assert len(problems) == 7, text
