"""The two Cloud Build stages (issue: third-party code ran with deploy rights).

cloudbuild.yaml (verify, the entry users run) runs the test suite and every third-party tool, and
changes nothing; cloudbuild-release.yaml (release, privileged) runs only the project's own code and
Terraform, in images pinned to exact versions, with where-to-deploy passed as -var. Checked offline
from the YAML alone.
"""

from __future__ import annotations

import re

import pytest
import yaml

from .conftest import REPO

# Cloud Build's own substitutions (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILT_INS = {"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA",
             "SHORT_SHA", "REVISION_ID", "BRANCH_NAME", "TAG_NAME", "REPO_NAME", "REPO_FULL_NAME",
             "TRIGGER_BUILD_CONFIG_PATH", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT", "_HEAD_BRANCH",
             "_BASE_BRANCH", "_HEAD_REPO_URL", "_PR_NUMBER"}
# What changes a project or reads its state.
DEPLOYING = re.compile(r"\b(plan|apply|destroy|import)\b|functions\s+deploy|-backend-config|gcloud\s+(?!version)")
# What runs code from a package registry.
THIRD_PARTY = re.compile(r"\b(pip|pip3|npm|npx|make|pytest|\.ci/run|apt-get|apk|curl|wget)\b")

# `$NAME` / `${NAME}` not preceded by another `$` (`$$NAME` is a literal shell variable).
_SUBSTITUTION = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# An image pinned to an exact version (x.y.z, optionally with a variant suffix) or a digest.
_PINNED_IMAGE = re.compile(r"^[a-z0-9./_-]+(?::[0-9]+\.[0-9]+\.[0-9]+(?:-[a-z0-9.-]+)?)?(?:@sha256:[0-9a-f]{64})?$")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module", params=["cloudbuild.yaml", "cloudbuild-release.yaml"])
def any_build(request) -> tuple[str, dict]:
    return request.param, load(request.param)


@pytest.fixture(scope="module")
def verify() -> dict[str, dict]:
    return steps_of(load("cloudbuild.yaml"))


@pytest.fixture(scope="module")
def release() -> dict[str, dict]:
    return steps_of(load("cloudbuild-release.yaml"))


def steps_of(build: dict) -> dict[str, dict]:
    ids = [step.get("id") for step in build["steps"]]
    assert all(ids) and len(set(ids)) == len(ids), "every step needs a unique id (waitFor refers to them)"
    return {step["id"]: step for step in build["steps"]}


def step_text(step: dict) -> str:
    return " ".join(str(part) for part in [step.get("entrypoint", ""), *step.get("args", [])])


def test_verify_runs_the_whole_suite_and_checks_terraform(verify):
    text = step_text(verify["test"])
    assert ".ci/run" in text or "make test" in text
    # The suite needs the Pub/Sub emulator: the (full) google-cloud-cli image ships it.
    assert verify["test"]["name"].startswith("gcr.io/google.com/cloudsdktool/google-cloud-cli:")
    validate = step_text(verify["tf-validate"])
    assert "terraform validate" in validate and "-backend=false" in validate


def test_verify_changes_nothing_and_reads_no_state(verify):
    for sid, step in verify.items():
        assert not DEPLOYING.search(step_text(step)), f"{sid} deploys or reads state in the unprivileged build"
        assert "env" not in step or not any("TF_VAR_project_id" in e for e in step["env"])


def test_release_runs_only_the_projects_own_code_and_terraform(release):
    assert set(release) == {"package", "tf-init", "tf-plan", "tf-apply"}
    for sid, step in release.items():
        assert not THIRD_PARTY.search(step_text(step)), f"{sid} runs registry code in the privileged build"
        image = step["name"].split("@")[0].split(":")[0]
        assert image in ("python", "hashicorp/terraform"), f"{sid}: unexpected image {step['name']}"
    assert release["package"]["args"] == ["deploy/package.py", "--out", "build/functions"]
    # The project's own packager uses the standard library only: nothing to install.
    imports = set(re.findall(r"^(?:import|from) (\w+)", (REPO / "deploy" / "package.py").read_text(), re.MULTILINE))
    assert imports <= {"__future__", "argparse", "hashlib", "re", "shutil", "sys", "pathlib"}, imports


def test_release_applies_the_reviewed_plan_after_init(release):
    order = list(release)
    assert order.index("package") < order.index("tf-plan") < order.index("tf-apply")
    assert order.index("tf-init") < order.index("tf-plan")
    for step in release.values():
        assert "waitFor" not in step, "release steps run in order, each after the previous"
    assert release["tf-apply"]["args"] == ["apply", "-input=false", "tfplan"]
    assert "-out=tfplan" in release["tf-plan"]["args"]


def test_release_passes_where_to_deploy_as_var(release):
    """-var beats terraform.tfvars; the state prefix names the same project."""
    args = release["tf-plan"]["args"]
    assert "-var=project_id=${_PROJECT}" in args
    assert "-var=region=${_REGION}" in args
    assert "-var=cluster=${_CLUSTER}" in args
    assert "prefix=meshjoin/${_PROJECT}" in step_text(release["tf-init"])
    # The patterns that keep verify clean do recognise the release's steps (they can fail).
    assert DEPLOYING.search(step_text(release["tf-plan"])) and DEPLOYING.search(step_text(release["tf-init"]))
    assert not any(e.startswith(("TF_VAR_project_id", "TF_VAR_region", "TF_VAR_cluster="))
                   for e in release["tf-plan"].get("env", []))


def test_lock_file_is_enforced_when_present(verify, release):
    for step in (verify["tf-validate"], release["tf-init"]):
        text = step_text(step)
        assert "-lockfile=readonly" in text and ".terraform.lock.hcl" in text


def test_no_latest_or_floating_images(any_build):
    name, build = any_build
    for step in build["steps"]:
        image = step["name"]
        assert ":latest" not in image, f"{name}: {image}"
        assert _PINNED_IMAGE.match(image) and (":" in image or "@sha256:" in image), \
            f"{name}: {image} is not pinned to an exact version or digest"


def test_image_pin_pattern_refuses_floating_tags():
    for floating in ("python:3.11-slim", "hashicorp/terraform:latest", "hashicorp/terraform:1.11",
                     "gcr.io/google.com/cloudsdktool/google-cloud-cli:stable", "python"):
        assert not (_PINNED_IMAGE.match(floating) and ":" in floating and re.search(r":\d+\.\d+\.\d+", floating)), floating


def test_terraform_images_agree_and_meet_required_version():
    versions = (REPO / "deploy" / "terraform" / "versions.tf").read_text()
    minimum = re.search(r'required_version\s*=\s*">=\s*([0-9.]+)"', versions).group(1)
    images = {s["name"] for f in ("cloudbuild.yaml", "cloudbuild-release.yaml") for s in load(f)["steps"]
              if s["name"].startswith("hashicorp/terraform")}
    assert len(images) == 1, images
    version = images.pop().split(":")[1]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def test_every_substitution_used_is_defined_and_every_defined_one_used(any_build):
    name, build = any_build
    text = (REPO / name).read_text()
    body = text.split("\nsteps:", 1)[1]  # uses in steps; the substitutions block may use built-ins
    used = {a or b for a, b in _SUBSTITUTION.findall(body)}
    defined = set(build.get("substitutions") or {})
    assert all(n.startswith("_") for n in defined), "user substitutions must start with _"
    assert used - defined - BUILT_INS == set(), f"{name}: undefined substitutions (write $$VAR for shell variables)"
    assert defined - used == set(), f"{name}: defined but never used (MUST_MATCH would fail the build)"
    assert build["options"]["substitution_option"] == "MUST_MATCH"


def test_package_step_matches_make_package(verify, release):
    makefile = (REPO / "Makefile").read_text()
    assert "deploy/package.py --out build/functions" in makefile
    assert verify["package"]["args"] == release["package"]["args"] == ["deploy/package.py", "--out", "build/functions"]


def test_the_builds_need_nothing_beside_the_checkout(any_build):
    """The sandbox's Istio CRDs ship in the repository: no step fetches them, no volume stands in for them."""
    name, build = any_build
    text = (REPO / name).read_text()
    assert "fetch_istio_crds" not in text and "/shared" not in text
    assert not any(step.get("volumes") for step in build["steps"])
