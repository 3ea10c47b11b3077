"""`sandbox up`'s `terraform apply` of the module's project metadata items (deploy/terraform/agent.tf: the VM
agent, published once per VM project), written through the Compute emulator's own API as the operator.

`google_compute_project_metadata_item` manages one key of a project's common instance metadata: the
provider reads the project's metadata and writes it back with that key set, under the fingerprint rule
(`projects.setCommonInstanceMetadata`, 412 on a stale fingerprint: read again). This does the same.
"""

from __future__ import annotations

import time

RESOURCE = "google_compute_project_metadata_item"


def terraform_metadata_items(variables: dict, project_number: str | None = None, directory=None) -> list[dict]:
    """[{project, key, value}] that `terraform apply` of deploy/terraform (or `directory`) writes."""
    from .terraform import default_terraform_dir, load_terraform

    model = load_terraform(directory or default_terraform_dir(), variables, project_number=project_number)
    items = []
    for resource in model.resources(RESOURCE):
        project = resource.get("project") or model.provider_project()
        items.append({"project": project, "key": resource["key"], "value": resource["value"],
                      "address": resource["_address"]})
    return items


def apply_project_metadata_items(cfg, attempts: int = 5, timeout: float = 30.0) -> list[dict]:
    """Set each item on its project through the Compute API (as the operator); returns what was applied."""
    import requests

    base = cfg.url("compute") + "/compute/v1/projects"
    headers = {"Authorization": f"Bearer {cfg.admin_token}"}
    items = terraform_metadata_items(cfg.terraform_vars, cfg.project_number)
    for item in items:
        url = f"{base}/{item['project']}"
        for attempt in range(attempts):
            got = requests.get(url, headers=headers, timeout=10)
            if got.status_code != 200:
                raise RuntimeError(f"applying {item['address']}: projects.get {item['project']}: "
                                   f"{got.status_code} {got.text[:300]}")
            metadata = got.json().get("commonInstanceMetadata") or {}
            kept = [i for i in metadata.get("items", []) if i["key"] != item["key"]]
            body = {"fingerprint": metadata.get("fingerprint"),
                    "items": kept + [{"key": item["key"], "value": item["value"]}]}
            response = requests.post(f"{url}/setCommonInstanceMetadata", json=body, headers=headers, timeout=10)
            if response.status_code == 412 and attempt + 1 < attempts:
                continue  # someone wrote meanwhile: read again, as the provider does
            if response.status_code != 200:
                raise RuntimeError(f"applying {item['address']}: {response.status_code} {response.text[:300]}")
            _wait_done(requests, url, response.json(), headers, time.monotonic() + timeout, item["address"])
            break
    return items


def _wait_done(requests, project_url: str, operation: dict, headers: dict, deadline: float, what: str) -> None:
    """Terraform waits for the global operation to be DONE before it reports the resource created."""
    while operation.get("status") != "DONE":
        if time.monotonic() > deadline:
            raise RuntimeError(f"applying {what}: operation {operation.get('name')} not done in time")
        time.sleep(0.05)
        response = requests.get(f"{project_url}/global/operations/{operation['name']}", headers=headers, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"applying {what}: globalOperations.get: {response.status_code} {response.text[:300]}")
        operation = response.json()
    if operation.get("error"):
        raise RuntimeError(f"applying {what}: {operation['error']}")
