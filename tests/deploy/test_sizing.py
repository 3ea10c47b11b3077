"""Overload and overlap (issue: 429s turned into dead letters, sweeps could overlap): the events
function's instances, concurrency and delivery attempts are sized together, and evaluated here by
the real `terraform console` (local.events_sizing, the arithmetic main.tf explains)."""

from __future__ import annotations

import pytest

from .test_terraform import console, console_module, evaluate, needs_terraform, unref  # noqa: F401 (fixture)

COMPUTE_WRITES_PER_MINUTE = 1500  # Compute Engine mutations, per project (DESIGN: quotas; older published default)


def retry_window(attempts: int) -> int:
    """Seconds a message refused every time waits before it is parked: the backoffs between attempts."""
    return sum(min(10 * 2 ** i, 600) for i in range(attempts - 1))


def test_retry_window_arithmetic():
    assert retry_window(5) == 10 + 20 + 40 + 80
    assert retry_window(10) == 10 + 20 + 40 + 80 + 160 + 320 + 600 + 600 + 600


@needs_terraform
def test_default_sizing_drains_a_burst_before_dead_lettering_and_stays_in_quota(console_module):
    sizing = evaluate(console_module, "local.events_sizing")
    assert sizing["in_flight"] > 1, "concurrency and instances together, not one request per instance"
    assert sizing["retry_window_seconds"] == retry_window(10)
    assert sizing["drain_seconds"] < sizing["retry_window_seconds"]
    assert sizing["joins_per_minute"] * sizing["writes_per_join"] <= COMPUTE_WRITES_PER_MINUTE
    assert sizing["write_quota_pm"] == COMPUTE_WRITES_PER_MINUTE


@needs_terraform
def test_the_old_sizing_is_the_overload_the_issue_describes(console_module):
    """Concurrency 1, 20 instances, 5 attempts: a burst of 1000 VMs outlasts the retries."""
    sizing = evaluate(console_module, "local.events_sizing", events_concurrency="1", events_max_instances="20",
                      events_max_delivery_attempts="5")
    assert sizing["drain_seconds"] >= sizing["retry_window_seconds"]


@needs_terraform
def test_too_much_capacity_exceeds_the_compute_write_quota(console_module):
    """Keys stay on the VMs: a join's writes are Compute metadata writes, none to Secret Manager."""
    sizing = evaluate(console_module, "local.events_sizing", events_concurrency="20", events_max_instances="20")
    assert sizing["joins_per_minute"] * sizing["writes_per_join"] > COMPUTE_WRITES_PER_MINUTE


def test_preconditions_enforce_the_arithmetic(terraform):
    push = terraform.resource("google_pubsub_subscription", "push")
    conditions = [unref(p["condition"]) for p in push["lifecycle"][0]["precondition"]]
    assert any("joins_per_minute" in c and "write_quota_pm" in c for c in conditions)
    assert any("drain_seconds" in c and "retry_window_seconds" in c for c in conditions)
    assert any("sweep_spacing_ok" in c for c in conditions)


def test_events_function_serves_concurrently_and_ticks_never_dead_letter(terraform):
    functions = terraform.locals["functions"]
    events, maintenance = functions["events"], functions["maintenance"]
    assert unref(events["concurrency"]) == "var.events_concurrency"
    assert events["cpu"] == "1", "Cloud Run functions need a whole vCPU for concurrency above 1"
    assert unref(events["max_delivery_attempts"]) == "var.events_max_delivery_attempts"
    # One sweep at a time, and a refused tick expires instead of becoming a dead letter.
    assert maintenance["max_instances"] == 1 and maintenance["concurrency"] == 1
    assert maintenance["max_delivery_attempts"] is None
    service = terraform.resource("google_cloudfunctions2_function", "fn")["service_config"][0]
    assert unref(service["max_instance_request_concurrency"]) == "each.value.concurrency"


@needs_terraform
@pytest.mark.parametrize("minutes", ["1", "5", "6"])
def test_sweep_interval_must_exceed_the_sweep_timeout(console_module, minutes):
    result = console(console_module, "1", sweep_interval_minutes=minutes)
    assert "Invalid value for variable" in result.stderr and "sweep_interval_minutes" in result.stderr


@needs_terraform
def test_sweep_spacing(console_module):
    assert evaluate(console_module, "local.sweep_spacing_ok", sweep_interval_minutes="10") is True
    functions = evaluate(console_module, "{ for k, f in local.functions : k => f.timeout_seconds }")
    assert functions["maintenance"] < 10 * 60


# --- issue 16: the events function's instances share the quotas the sweep's published work uses -----


def test_the_events_quota_share_is_bounded_by_a_precondition(terraform):
    fn = terraform.resource("google_cloudfunctions2_function", "fn")
    conditions = [unref(p["condition"]) for p in fn["lifecycle"][0]["precondition"]]
    assert any("var.events_max_instances * local.events_quota_share" in c and "var.quota_reserve" in c
               for c in conditions)


@needs_terraform
def test_the_derived_events_share_keeps_the_reserve(console_module):
    assert evaluate(console_module, "local.events_quota_share") == 0.1  # (1 - 0.2) / 8
    assert evaluate(console_module, "local.events_quota_share", events_max_instances="3") == 0.26
    assert evaluate(console_module, "local.events_quota_share", quota_share="0.05") == 0.05
    env = evaluate(console_module, "local.function_env")
    assert env["MESHJOIN_SWEEP_INTERVAL"] == "10m" and env["MESHJOIN_QUOTA_RESERVE"] == "0.2"
