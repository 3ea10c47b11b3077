"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from meshjoin.errors import SettingsError
from meshjoin.settings import IdentityBinding, Settings, parse_duration

BASE = {"MESHJOIN_PROJECT": "my-project", "MESHJOIN_CLUSTER": "projects/p/locations/l/clusters/c"}


def test_defaults():
    s = Settings.from_env(BASE)
    assert s.trust_domain == "cluster.local" and s.cert_ttl == timedelta(hours=24)
    assert s.identity_bindings == () and s.key_algorithm == "ecdsa-p256"  # default-deny
    assert s.key_rotation_renewals == 3  # a new key after 3 certificates for one key
    assert s.cluster_location == "l"


def test_parses_values():
    s = Settings.from_env({**BASE, "MESHJOIN_CERT_TTL": "1h30m", "MESHJOIN_IDENTITY_BINDINGS": json.dumps(
        [{"gsa": "orders@my-project.iam.gserviceaccount.com", "namespace": "apps", "serviceAccount": "orders",
          "apps": ["orders", "orders-admin"]}]),
                           "MESHJOIN_KEY_ALGORITHM": "rsa-2048", "MESHJOIN_RENEW_FRACTION": "0.6",
                           "MESHJOIN_KEY_ROTATION_RENEWALS": "0"})
    assert s.cert_ttl == timedelta(hours=1, minutes=30)
    assert s.identity_bindings == (IdentityBinding("orders@my-project.iam.gserviceaccount.com", "apps", "orders",
                                                   ("orders", "orders-admin")),)
    assert s.key_algorithm == "rsa-2048" and s.renew_fraction == 0.6
    assert s.key_rotation_renewals == 0  # never ask for a new key


@pytest.mark.parametrize("env, variable", [
    pytest.param({"MESHJOIN_CLUSTER": BASE["MESHJOIN_CLUSTER"]}, "MESHJOIN_PROJECT", id="missing project"),
    pytest.param({"MESHJOIN_PROJECT": "p"}, "MESHJOIN_CLUSTER", id="missing cluster"),
    pytest.param({**BASE, "MESHJOIN_CLUSTER": "mesh"}, "MESHJOIN_CLUSTER", id="cluster not a path"),
    pytest.param({**BASE, "MESHJOIN_CERT_TTL": "soon"}, "MESHJOIN_CERT_TTL", id="bad duration"),
    pytest.param({**BASE, "MESHJOIN_CERT_TTL": "10s"}, "MESHJOIN_CERT_TTL", id="ttl too short"),
    pytest.param({**BASE, "MESHJOIN_KEY_ALGORITHM": "dsa"}, "MESHJOIN_KEY_ALGORITHM", id="bad algorithm"),
    pytest.param({**BASE, "MESHJOIN_RENEW_FRACTION": "1.5"}, "MESHJOIN_RENEW_FRACTION", id="fraction > 1"),
    pytest.param({**BASE, "MESHJOIN_KEY_ROTATION_RENEWALS": "-1"}, "MESHJOIN_KEY_ROTATION_RENEWALS",
                 id="negative rotation policy"),
    pytest.param({**BASE, "MESHJOIN_KEY_ROTATION_RENEWALS": "often"}, "MESHJOIN_KEY_ROTATION_RENEWALS",
                 id="rotation policy not a number"),
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


def binding(**changes) -> dict:
    return {"gsa": "orders@my-project.iam.gserviceaccount.com", "namespace": "apps", "serviceAccount": "orders",
            "apps": ["orders"], **changes}


@pytest.mark.parametrize("value, words", [
    pytest.param("orders@my-project.iam.gserviceaccount.com", "not JSON", id="not JSON"),
    pytest.param(json.dumps(binding()), "JSON list", id="an object, not a list"),
    pytest.param(json.dumps([{**binding(), "extra": 1}]), "exactly the keys", id="unknown key"),
    pytest.param(json.dumps([{k: v for k, v in binding().items() if k != "apps"}]), "exactly the keys",
                 id="missing apps"),
    pytest.param(json.dumps([binding(gsa="orders")]), "service account email", id="gsa not an email"),
    pytest.param(json.dumps([binding(gsa="orders@my-project.iam.gserviceaccount.com\n")]), "service account email",
                 id="gsa with trailing newline"),
    pytest.param(json.dumps([binding(namespace="Apps")]), "Kubernetes name", id="namespace upper case"),
    pytest.param(json.dumps([binding(serviceAccount="a/b")]), "Kubernetes name", id="ksa with slash"),
    pytest.param(json.dumps([binding(namespace="istio-system")]), "platform", id="istio-system"),
    pytest.param(json.dumps([binding(namespace="istio-ingress")]), "platform", id="istio-ingress"),
    pytest.param(json.dumps([binding(namespace="kube-system")]), "platform", id="kube-system"),
    pytest.param(json.dumps([binding(namespace="gke-managed-system")]), "platform", id="gke-*"),
    pytest.param(json.dumps([binding(namespace="gmp-public")]), "platform", id="gmp-*"),
    pytest.param(json.dumps([binding(namespace="cert-manager")]), "platform", id="cert-manager"),
    pytest.param(json.dumps([binding(apps=[])]), "non-empty", id="no apps"),
    pytest.param(json.dumps([binding(apps=["9lives"])]), "Service names", id="app not a Service name"),
    pytest.param(json.dumps([binding(apps=["a", "a"])]), "distinct", id="app twice"),
    pytest.param(json.dumps([binding(), binding()]), "bound twice", id="binding twice"),
])
def test_identity_bindings_are_validated_strictly(value, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**BASE, "MESHJOIN_IDENTITY_BINDINGS": value})
    assert "MESHJOIN_IDENTITY_BINDINGS" in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize("retired", ["MESHJOIN_ALLOWED_NAMESPACES", "MESHJOIN_ALLOWED_SERVICE_ACCOUNTS",
                                     "MESHJOIN_DEFAULT_NAMESPACE", "MESHJOIN_DEFAULT_SERVICE_ACCOUNT"])
def test_a_retired_allowlist_setting_is_refused_not_ignored(retired):
    with pytest.raises(SettingsError, match=f"{retired} is no longer read.*MESHJOIN_IDENTITY_BINDINGS"):
        Settings.from_env({**BASE, retired: "*"})


def test_duration_refuses_an_inner_newline():
    with pytest.raises(ValueError):
        parse_duration("1h\n30m")
