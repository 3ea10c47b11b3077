"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meshjoin.errors import SettingsError
from meshjoin.settings import Settings, parse_duration

BASE = {"MESHJOIN_PROJECT": "my-project", "MESHJOIN_CLUSTER": "projects/p/locations/l/clusters/c"}


def test_defaults():
    s = Settings.from_env(BASE)
    assert s.trust_domain == "cluster.local" and s.cert_ttl == timedelta(hours=24)
    assert s.allowed_namespaces == ("default",) and s.key_algorithm == "ecdsa-p256"
    assert s.cluster_location == "l"


def test_parses_values():
    s = Settings.from_env({**BASE, "MESHJOIN_CERT_TTL": "1h30m", "MESHJOIN_ALLOWED_NAMESPACES": "a, b,,c",
                           "MESHJOIN_KEY_ALGORITHM": "rsa-2048", "MESHJOIN_RENEW_FRACTION": "0.6"})
    assert s.cert_ttl == timedelta(hours=1, minutes=30)
    assert s.allowed_namespaces == ("a", "b", "c")
    assert s.key_algorithm == "rsa-2048" and s.renew_fraction == 0.6


@pytest.mark.parametrize("env, variable", [
    pytest.param({"MESHJOIN_CLUSTER": BASE["MESHJOIN_CLUSTER"]}, "MESHJOIN_PROJECT", id="missing project"),
    pytest.param({"MESHJOIN_PROJECT": "p"}, "MESHJOIN_CLUSTER", id="missing cluster"),
    pytest.param({**BASE, "MESHJOIN_CLUSTER": "mesh"}, "MESHJOIN_CLUSTER", id="cluster not a path"),
    pytest.param({**BASE, "MESHJOIN_CERT_TTL": "soon"}, "MESHJOIN_CERT_TTL", id="bad duration"),
    pytest.param({**BASE, "MESHJOIN_CERT_TTL": "10s"}, "MESHJOIN_CERT_TTL", id="ttl too short"),
    pytest.param({**BASE, "MESHJOIN_KEY_ALGORITHM": "dsa"}, "MESHJOIN_KEY_ALGORITHM", id="bad algorithm"),
    pytest.param({**BASE, "MESHJOIN_RENEW_FRACTION": "1.5"}, "MESHJOIN_RENEW_FRACTION", id="fraction > 1"),
    pytest.param({**BASE, "MESHJOIN_API_ATTEMPTS": "0"}, "MESHJOIN_API_ATTEMPTS", id="zero attempts"),
    pytest.param({**BASE, "MESHJOIN_RENEW_FRACTION": "0.95", "MESHJOIN_RENEW_JITTER": "0.1"},
                 "MESHJOIN_RENEW_FRACTION", id="fraction + jitter >= 1"),
])
def test_errors_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize("text, expected", [
    ("24h", timedelta(hours=24)), ("90m", timedelta(minutes=90)), ("1d2h", timedelta(days=1, hours=2)),
    ("45s", timedelta(seconds=45)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "1x", "-1h", "1.5h"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)
