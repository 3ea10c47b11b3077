"""cloudbuild.yaml: the tests gate every deploy step, and every substitution is defined and used."""

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
# What changes a project: a step running any of these must wait for the tests.
DEPLOYING = re.compile(r"\b(plan|apply)\b|functions\s+deploy")

# `$NAME` / `${NAME}` not preceded by another `$` (`$$NAME` is a literal shell variable).
_SUBSTITUTION = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@pytest.fixture(scope="module")
def build() -> dict:
    return yaml.safe_load((REPO / "cloudbuild.yaml").read_text())


@pytest.fixture(scope="module")
def steps(build) -> dict[str, dict]:
    ids = [step.get("id") for step in build["steps"]]
    assert all(ids) and len(set(ids)) == len(ids), "every step needs a unique id (waitFor refers to them)"
    return {step["id"]: step for step in build["steps"]}


def step_text(step: dict) -> str:
    return " ".join(str(part) for part in [step.get("entrypoint", ""), *step.get("args", [])])


def prerequisites(steps: dict[str, dict], step_id: str) -> set[str]:
    """Every step `step_id` waits for, transitively. No waitFor means: all steps before it."""
    order = list(steps)
    seen: set[str] = set()
    todo = [step_id]
    while todo:
        current = todo.pop()
        wait_for = steps[current].get("waitFor")
        if wait_for is None:
            direct = order[:order.index(current)]
        elif wait_for == ["-"]:
            direct = []
        else:
            direct = wait_for
        for dep in direct:
            assert dep in steps, f"{current} waits for unknown step {dep}"
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_test_step_runs_the_whole_suite(steps):
    text = step_text(steps["test"])
    assert ".ci/run" in text or "make test" in text
    # The suite needs the Pub/Sub emulator: the google-cloud-cli image ships it.
    assert steps["test"]["name"].startswith("gcr.io/google.com/cloudsdktool/google-cloud-cli")


def test_every_deploying_step_waits_for_the_tests(steps):
    deploying = [sid for sid, step in steps.items() if DEPLOYING.search(step_text(step))]
    assert {"tf-plan", "tf-apply"} <= set(deploying)
    for sid in deploying:
        assert "test" in prerequisites(steps, sid), f"{sid} could run before (or without) the tests"


def test_apply_applies_the_reviewed_plan(steps):
    assert "tf-plan" in prerequisites(steps, "tf-apply")
    assert "tfplan" in steps["tf-apply"]["args"]
    assert any(arg.startswith("-out=tfplan") for arg in steps["tf-plan"]["args"])


def test_steps_that_do_not_wait_change_nothing(steps):
    for sid, step in steps.items():
        if "test" not in prerequisites(steps, sid) and sid != "test":
            assert not DEPLOYING.search(step_text(step)), sid


def test_every_substitution_used_is_defined_and_every_defined_one_used(build):
    text = (REPO / "cloudbuild.yaml").read_text()
    body = text.split("\nsteps:", 1)[1]  # uses in steps; the substitutions block may use built-ins
    used = {a or b for a, b in _SUBSTITUTION.findall(body)}
    defined = set(build["substitutions"])
    assert all(name.startswith("_") for name in defined), "user substitutions must start with _"
    assert used - defined - BUILT_INS == set(), "undefined substitutions (write $$VAR for shell variables)"
    assert defined - used == set(), "defined but never used (MUST_MATCH would fail the build)"
    assert build["options"]["substitution_option"] == "MUST_MATCH"
    assert {"_PROJECT", "_REGION", "_CLUSTER"} <= defined


def test_terraform_gets_project_region_and_cluster(steps):
    env = dict(item.split("=", 1) for item in steps["tf-plan"]["env"])
    assert env["TF_VAR_project_id"] == "${_PROJECT}"
    assert env["TF_VAR_region"] == "${_REGION}"
    assert env["TF_VAR_cluster"] == "${_CLUSTER}"


def test_package_step_matches_make_package(steps):
    makefile = (REPO / "Makefile").read_text()
    assert "deploy/package.py --out build/functions" in makefile
    assert steps["package"]["args"] == ["deploy/package.py", "--out", "build/functions"]


def test_terraform_image_matches_the_local_pin(steps):
    versions = (REPO / "deploy" / "terraform" / "versions.tf").read_text()
    minimum = re.search(r'required_version\s*=\s*">=\s*([0-9.]+)"', versions).group(1)
    for sid in ("tf-init", "tf-plan", "tf-apply"):
        image_version = steps[sid]["name"].split(":")[1]
        assert tuple(map(int, image_version.split("."))) >= tuple(map(int, minimum.split(".")))
    assert len({steps[sid]["name"] for sid in ("tf-init", "tf-plan", "tf-apply")}) == 1


def test_the_build_needs_nothing_beside_the_checkout(build):
    """The sandbox's Istio CRDs ship in the repository: no step fetches them, no volume stands in for them."""
    text = (REPO / "cloudbuild.yaml").read_text()
    assert "fetch_istio_crds" not in text and "/shared" not in text
    assert not any(step.get("volumes") for step in build["steps"])
