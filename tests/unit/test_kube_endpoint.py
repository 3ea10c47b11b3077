"""Which Kubernetes API endpoint the kube adapter uses (MESHJOIN_CLUSTER_ENDPOINT): the IP endpoint
with the cluster's CA, or GKE's DNS-based endpoint with the system's trust (private clusters)."""

from __future__ import annotations

import base64

import pytest
from google.cloud import container_v1

from meshjoin.adapters.kube import api_server
from meshjoin.errors import PermanentError
from meshjoin.settings import Settings, SettingsError

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
DNS = "gke-0123456789abcdef-123456789012.us-central1.gke.goog"


def cluster(dns: str = DNS) -> container_v1.Cluster:
    return container_v1.Cluster(
        name="mesh", endpoint="10.0.0.2",
        master_auth=container_v1.MasterAuth(cluster_ca_certificate=base64.b64encode(CA).decode()),
        control_plane_endpoints_config=container_v1.ControlPlaneEndpointsConfig(
            dns_endpoint_config=container_v1.ControlPlaneEndpointsConfig.DNSEndpointConfig(endpoint=dns)))


def test_ip_endpoint_pins_the_cluster_ca():
    assert api_server(cluster(), "ip") == ("10.0.0.2", CA)


def test_dns_endpoint_trusts_the_system_store():
    assert api_server(cluster(), "dns") == (DNS, None)


def test_dns_endpoint_missing_is_a_permanent_error_naming_the_fix():
    with pytest.raises(PermanentError, match="enable-dns-access"):
        api_server(cluster(dns=""), "dns")


@pytest.mark.parametrize("raw, expected", [(None, "ip"), ("ip", "ip"), ("dns", "dns")])
def test_setting(raw, expected):
    env = {"MESHJOIN_PROJECT": "p", "MESHJOIN_CLUSTER": "projects/p/locations/l/clusters/c"}
    if raw is not None:
        env["MESHJOIN_CLUSTER_ENDPOINT"] = raw
    assert Settings.from_env(env).cluster_endpoint == expected


def test_setting_refuses_other_values():
    with pytest.raises(SettingsError, match="MESHJOIN_CLUSTER_ENDPOINT"):
        Settings.from_env({"MESHJOIN_PROJECT": "p", "MESHJOIN_CLUSTER": "projects/p/locations/l/clusters/c",
                           "MESHJOIN_CLUSTER_ENDPOINT": "private"})
