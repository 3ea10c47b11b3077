"""CA rotation in the sandbox, as an operator would do it: add new versions of the plug-in CA secrets.

The new `istio-root-cert` version holds only the new root; meshjoin trusts every ENABLED version of
that secret, so VMs get both roots until the old version is disabled (the old root retired).
"""

from __future__ import annotations

import json
from pathlib import Path

from .ca import make_rotated_ca

CA_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")


def rotate_plugin_ca(world) -> dict:
    secrets = world.emulators["secretmanager"]
    config = json.loads((Path(world.state_dir) / "sandbox.json").read_text())
    old_dir = Path(config["ca_dir"])
    generation = len(list(Path(world.state_dir).glob("ca-rotated-*"))) + 1
    new_dir = Path(world.state_dir) / f"ca-rotated-{generation}"
    new_dir.mkdir()
    previous = Path(world.state_dir) / f"ca-rotated-{generation - 1}" if generation > 1 else old_dir
    make_rotated_ca(new_dir, previous, root_name=f"sandbox root {generation + 1}", include_old_roots=False)
    versions = {}
    for filename, secret_id in zip(CA_FILES, config["ca_secrets"]):
        versions[secret_id] = secrets.put(secret_id, (new_dir / filename).read_bytes())
    return {"ca_dir": str(new_dir), "versions": versions}
