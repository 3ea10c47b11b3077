"""The quota model (shared/meshjoin/capacity.py): pure arithmetic, checked by hand-computed figures."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from meshjoin import capacity
from meshjoin.errors import SettingsError
from meshjoin.settings import Settings

S = Settings(project="p", cluster="projects/p/locations/l/clusters/c")


def test_default_quotas_are_the_published_ones():
    q = capacity.DEFAULT_QUOTAS
    assert q[capacity.COMPUTE_READ] == q[capacity.COMPUTE_WRITE] == q[capacity.COMPUTE_OPERATION_READ] == 1500
    assert q[capacity.COMPUTE_FILTERED_LIST_COST] == 750_000
    assert (q[capacity.SECRETS_READ], q[capacity.SECRETS_WRITE], q[capacity.SECRETS_ACCESS]) == (600, 600, 90_000)
    assert capacity.KUBE_SEATS == 49  # ceil(600 x 20 / 245): the global-default priority level


def test_a_renewal_costs_its_two_passes_and_a_third_of_a_rotation():
    calls = capacity.calls_per_work(S, capacity.RENEW)  # MESHJOIN_KEY_ROTATION_RENEWALS=3
    assert calls[capacity.COMPUTE_READ] == pytest.approx(4 + 4 / 3)
    assert calls[capacity.COMPUTE_WRITE] == pytest.approx(2 + 2 / 3)
    never = capacity.calls_per_work(replace(S, key_rotation_renewals=0), capacity.RENEW)
    assert never[capacity.COMPUTE_READ] == 4
    assert capacity.CALLS_PER_WORK[capacity.JOIN][capacity.COMPUTE_WRITE] == 3
    assert sum(capacity.CALLS_PER_WORK[capacity.JOIN].values()) == pytest.approx(16.37, abs=0.01)  # BENCHMARKS.md
    assert sum(capacity.CALLS_PER_WORK[capacity.RENEW].values()) == 7 + 6  # its pass and its report's pass


def test_renewals_are_bound_by_compute_reads():
    assert capacity.bottleneck(S, capacity.RENEW) == capacity.COMPUTE_READ
    # 1500 reads x 0.4 / (16/3 reads per renewal) = 112.5 a minute.
    assert capacity.works_per_minute(S, capacity.RENEW) == pytest.approx(112.5)
    assert capacity.sweep_work_budget(S) == 1125  # x 10 minutes
    assert capacity.work_cost(S, capacity.JOIN) > 1 > capacity.work_cost(S, capacity.PRUNE)


def test_the_budget_spends_exactly_the_work_share_of_the_bound_quota():
    budget = capacity.sweep_work_budget(S)
    use = capacity.quota_use(S, {capacity.RENEW: budget}, S.sweep_interval.total_seconds() / 60)
    assert max(use.values()) == pytest.approx(S.sweep_work_share, rel=0.01)
    assert use[capacity.SECRETS_WRITE] == 0


def test_budget_follows_quota_interval_and_the_optional_cap():
    assert capacity.sweep_work_budget(replace(S, compute_reads_per_minute=3000)) == 2250
    assert capacity.sweep_work_budget(replace(S, sweep_interval=timedelta(minutes=20))) == 2250
    assert capacity.sweep_work_budget(replace(S, sweep_renewals=200)) == 200
    assert capacity.sweep_work_budget(replace(S, compute_reads_per_minute=1)) == 1  # never 0: the sweep moves


def test_sustainable_fleet_follows_fleet_lifetime_and_quota():
    # 1125 per 10 min = 6750 an hour; a VM renews every 24 h x (0.5 - 0.05) = 10.8 h: 72,900 VMs.
    assert capacity.mean_renewal_period(S) == timedelta(hours=10, minutes=48)
    assert capacity.renewals_per_hour(S) == 6750
    assert capacity.sustainable_fleet(S) == 72_900
    assert capacity.sustainable_fleet(replace(S, cert_ttl=timedelta(hours=48))) == 2 * 72_900
    assert capacity.sustainable_fleet(replace(S, compute_reads_per_minute=3000)) == 2 * 72_900
    assert capacity.sustainable_fleet(replace(S, key_rotation_renewals=0)) == 97_200


def test_events_aggregate_share():
    assert capacity.events_aggregate_share(8, 0.1) == pytest.approx(0.8)


@pytest.mark.parametrize("env, message", [
    ({"MESHJOIN_SWEEP_INTERVAL": "30s"}, "MESHJOIN_SWEEP_INTERVAL"),
    ({"MESHJOIN_SWEEP_INTERVAL": "ten"}, "MESHJOIN_SWEEP_INTERVAL"),
    ({"MESHJOIN_QUOTA_RESERVE": "1.5"}, "MESHJOIN_QUOTA_RESERVE"),
    ({"MESHJOIN_SWEEP_WORK_SHARE": "0"}, "MESHJOIN_SWEEP_WORK_SHARE"),
    ({"MESHJOIN_SWEEP_WORK_SHARE": "0.9", "MESHJOIN_QUOTA_RESERVE": "0.2"}, "MESHJOIN_SWEEP_WORK_SHARE"),
])
def test_pacing_settings_refuse_bad_values(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"MESHJOIN_PROJECT": "p", "MESHJOIN_CLUSTER": S.cluster, **env})


def test_pacing_settings_are_read():
    s = Settings.from_env({"MESHJOIN_PROJECT": "p", "MESHJOIN_CLUSTER": S.cluster, "MESHJOIN_SWEEP_INTERVAL": "15m",
                           "MESHJOIN_QUOTA_RESERVE": "0.1", "MESHJOIN_SWEEP_WORK_SHARE": "0.6",
                           "MESHJOIN_SWEEP_RENEWALS": "300"})
    assert (s.sweep_interval, s.quota_reserve, s.sweep_work_share, s.sweep_renewals) == \
        (timedelta(minutes=15), 0.1, 0.6, 300)
    assert S.sweep_renewals is None
