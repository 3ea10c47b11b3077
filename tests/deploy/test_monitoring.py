"""deploy/terraform/monitoring.tf is wired to what the product really logs.

Every `jsonPayload.<field>` a log-based metric's filter names, with the value it compares, must be
emitted together by at least one `log(...)` call in shared/meshjoin (read from the source with
`ast`): a renamed field or outcome in the product fails here instead of silencing an alert.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import pytest

from meshjoin.logs import JsonFormatter  # noqa: F401 (the line shape: severity, message, time, logger)

from .conftest import REPO
from .test_terraform import console_module, evaluate, needs_terraform, unref  # noqa: F401 (fixture)

PRODUCT = REPO / "shared" / "meshjoin"
ALWAYS = {"severity", "message", "time", "logger"}  # JsonFormatter writes these on every line
KEY_FIELDS = {"vm", "project", "zone", "instance"}  # log(key=...) adds these


@dataclass
class LogCall:
    where: str
    fields: set[str]
    outcomes: set[str]  # possible values of `outcome`
    message_prefix: str  # the literal start of the message ("" if it starts with a value)
    states: set[str]


def _enum_values(module: str, name: str) -> set[str]:
    """The string values of enum class `name` in `module` (`MEMBER = "value"` lines)."""
    for node in ast.walk(ast.parse((PRODUCT / module).read_text())):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {item.value.value for item in node.body if isinstance(item, ast.Assign)
                    and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str)}
    return set()


def _outcome_verbs() -> tuple[set[str], set[str]]:
    """Every verb and state an Outcome(...) can carry: the members of plan.Verb and status.State, and any
    literal reconcile.py still passes."""
    tree = ast.parse((PRODUCT / "reconcile.py").read_text())
    verbs, states = _enum_values("plan.py", "Verb"), _enum_values("status.py", "State")
    assert {"registered", "renewed", "failed"} <= verbs and {"joined", "waiting", "error"} <= states
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Outcome":
            if node.args and isinstance(node.args[0], ast.Constant):
                verbs.add(node.args[0].value)
            for kw in node.keywords:
                if kw.arg == "state" and isinstance(kw.value, ast.Constant):
                    states.add(kw.value.value)
    return verbs, states


def log_calls() -> list[LogCall]:
    verbs, states = _outcome_verbs()
    calls = []
    for path in sorted(PRODUCT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "log"):
                continue
            fields = set(ALWAYS)
            outcomes: set[str] = set()
            call_states: set[str] = set()
            for kw in node.keywords:
                if kw.arg is None:  # **summary.as_log_fields() etc.: not counted, so never vouched for
                    continue
                if kw.arg == "key":
                    fields |= KEY_FIELDS
                elif kw.arg == "exc_info":
                    fields.add("error")
                else:
                    fields.add(kw.arg)
                if kw.arg == "outcome":
                    outcomes = {kw.value.value} if isinstance(kw.value, ast.Constant) else set(verbs)
                if kw.arg == "state":
                    call_states = {kw.value.value} if isinstance(kw.value, ast.Constant) else set(states)
            message = node.args[1]
            if isinstance(message, ast.Constant):
                prefix = message.value
            elif isinstance(message, ast.JoinedStr):
                prefix = message.values[0].value if message.values and isinstance(message.values[0], ast.Constant) else ""
            elif isinstance(message, ast.BinOp) and isinstance(message.left, ast.Constant):
                prefix = message.left.value
            else:
                prefix = ""
            calls.append(LogCall(f"{path.relative_to(REPO)}:{node.lineno}", fields, outcomes, prefix, call_states))
    return calls


# jsonPayload.F="v" | jsonPayload.F=~"re" | jsonPayload.F:* | jsonPayload.F < n
_CONDITION = re.compile(r'jsonPayload\.(\w+)\s*(=~|=|:|<|>)\s*("(?:[^"\\]|\\.)*"|\*|[0-9.]+)')


def conditions(filter_text: str) -> list[tuple[str, str, str]]:
    return [(f, op, v.strip('"')) for f, op, v in _CONDITION.findall(filter_text)]


def satisfies(call: LogCall, field: str, op: str, value: str) -> bool:
    if field not in call.fields:
        return False
    if field == "outcome" and op == "=":
        return value in call.outcomes
    if field == "state" and op == "=":
        return value in call.states
    if field == "message" and op == "=~":
        # An anchored pattern must match the message's literal start.
        return value.startswith("^") and re.match(value, call.message_prefix) is not None
    return op in (":", "<", ">") or field not in ("outcome", "state", "message")


@pytest.fixture(scope="module")
def calls() -> list[LogCall]:
    found = log_calls()
    assert len(found) > 10 and any(c.outcomes for c in found)
    return found


@pytest.fixture(scope="module")
def filters(console_module) -> dict[str, str]:
    """Each metric's filter as Terraform renders it (default variables)."""
    counters = evaluate(console_module, "{ for k, v in local.log_counters : k => v.filter }")
    return {**counters, "event_outcomes": evaluate(console_module, "local.event_outcomes_filter")}


@needs_terraform
def test_the_issue_s_metrics_exist(filters):
    assert {"joins", "denials", "failures", "sweep_aborts", "certs_near_expiry", "event_outcomes"} <= set(filters)


@needs_terraform
def test_every_metric_filter_matches_lines_the_product_writes(filters, calls):
    problems = []
    for name, text in filters.items():
        wanted = conditions(text)
        assert wanted, f"{name}: filter names no jsonPayload field"
        if not any(all(satisfies(call, *c) for c in wanted) for call in calls):
            problems.append(f"{name}: no log(...) call emits all of {wanted}")
    assert problems == [], "\n".join(problems)


@needs_terraform
def test_metrics_read_the_functions_own_logs(filters):
    for name, text in filters.items():
        assert 'resource.type="cloud_run_revision"' in text, name
        assert re.search(r'resource\.labels\.service_name=\(?"meshjoin-(events|maintenance)"', text), name


def test_the_checker_refuses_fields_the_product_does_not_write(calls):
    assert not any(all(satisfies(c, *cond) for cond in conditions('jsonPayload.outcome="joined"')) for c in calls)
    assert not any(all(satisfies(c, *cond) for cond in conditions('jsonPayload.result="failed"')) for c in calls)
    assert not any(all(satisfies(c, *cond) for cond in conditions(
        'jsonPayload.outcome="denied" AND jsonPayload.message=~"^sweep aborted"')) for c in calls)
    assert any(all(satisfies(c, *cond) for cond in conditions(
        'jsonPayload.outcome="failed" AND jsonPayload.message=~"^sweep aborted"')) for c in calls)


def test_alert_policies_cover_the_issue(terraform):
    policies = {name: body for (rtype, name), body in terraform.resources.items()
                if rtype == "google_monitoring_alert_policy"}
    assert set(policies) == {"dead_letters", "sweep_aborted", "cert_near_expiry", "join_failure_rate"}
    dead = policies["dead_letters"]["conditions"][0]["condition_threshold"][0]["filter"]
    assert "num_undelivered_messages" in dead and "google_pubsub_subscription.dead_letter.name" in dead
    assert "local.metric_type.sweep_aborts" in policies["sweep_aborted"]["conditions"][0]["condition_threshold"][0]["filter"]
    assert "local.metric_type.certs_near_expiry" in policies["cert_near_expiry"]["conditions"][0]["condition_threshold"][0]["filter"]
    rate = policies["join_failure_rate"]["conditions"][0]["condition_threshold"][0]
    assert 'metric.labels.outcome=\\"failed\\"' in rate["filter"] or 'metric.labels.outcome="failed"' in rate["filter"]
    assert "local.outcomes_metric_type" in rate["denominator_filter"]
    for body in policies.values():
        assert unref(body["notification_channels"]) == "var.alert_notification_channels"


def test_metric_types_match_the_metric_names(terraform):
    counter = terraform.resource("google_logging_metric", "counter")
    assert counter["name"] == "${var.name}/${each.key}"
    assert "${var.name}/${name}" in terraform.locals["metric_type"]
    outcomes = terraform.resource("google_logging_metric", "event_outcomes")
    assert unref(outcomes["filter"]) == "local.event_outcomes_filter"
    assert terraform.locals["outcomes_metric_type"] == f"logging.googleapis.com/user/{outcomes['name']}"


def test_a_dashboard_exists(terraform):
    dashboard = terraform.resource("google_monitoring_dashboard", "meshjoin")
    assert "mosaicLayout" in dashboard["dashboard_json"]
