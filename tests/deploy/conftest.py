"""Shared helpers for the deployment checks: the Terraform configuration parsed with python-hcl2
(providers cannot be downloaded here, so `terraform validate` is not available), and paths."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TF_DIR = REPO / "deploy" / "terraform"


class Terraform:
    """The module's blocks, merged across files, with strings unquoted and heredocs as text."""

    def __init__(self, directory: Path):
        import hcl2
        from hcl2 import SerializationOptions

        options = SerializationOptions(with_comments=False, explicit_blocks=False, preserve_heredocs=False,
                                       strip_string_quotes=True)
        self.files = sorted(directory.glob("*.tf"))
        self.text = "\n".join(path.read_text() for path in self.files)
        self.blocks: dict[str, list] = defaultdict(list)
        for path in self.files:
            with path.open() as f:
                for kind, items in hcl2.load(f, serialization_options=options).items():
                    self.blocks[kind].extend(items)

    def _labelled(self, kind: str) -> dict[str, dict]:
        return {name: body for block in self.blocks[kind] for name, body in block.items()}

    @property
    def variables(self) -> dict[str, dict]:
        return self._labelled("variable")

    @property
    def outputs(self) -> dict[str, dict]:
        return self._labelled("output")

    @property
    def locals(self) -> dict:
        return {name: value for block in self.blocks["locals"] for name, value in block.items()}

    @property
    def resources(self) -> dict[tuple[str, str], dict]:
        return {(rtype, name): body for block in self.blocks["resource"]
                for rtype, named in block.items() for name, body in named.items()}

    def resource(self, rtype: str, name: str) -> dict:
        return self.resources[(rtype, name)]


@pytest.fixture(scope="session")
def terraform() -> Terraform:
    return Terraform(TF_DIR)


def load_deploy_script(name: str):
    """Import deploy/<name>.py (a script directory, not a package) as a module."""
    import importlib.util
    import sys

    module_name = f"deploy_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
