"""The sweep summary's `soonest_cert_expiry_s` (watched by the certificate-expiry alert in
deploy/terraform/monitoring.tf): the least life left among the certificates delivered to joined VMs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meshjoin.sweep import soonest_cert_expiry

from .test_sweep_plan import NOW, inventory, status, vm


@pytest.mark.parametrize("vms, expected", [
    pytest.param([], None, id="no VMs"),
    pytest.param([vm("a")], None, id="never handled: no certificate"),
    pytest.param([vm("a", status("a", state="denied"))], None, id="denied VMs carry no certificate"),
    pytest.param([vm("a", status("a", issued=NOW - timedelta(hours=1)))], 23 * 3600, id="fresh"),
    pytest.param([vm("a", status("a", issued=NOW - timedelta(hours=1))),
                  vm("b", status("b", issued=NOW - timedelta(hours=20)))], 4 * 3600, id="the soonest wins"),
    pytest.param([vm("a", status("a", issued=NOW - timedelta(hours=25)))], -3600, id="expired is negative"),
    pytest.param([vm("a", status("a", issued=NOW - timedelta(hours=20), state="error")),
                  vm("b", status("b", issued=NOW - timedelta(hours=2)))], 22 * 3600, id="only joined VMs count"),
])
def test_soonest_cert_expiry(vms, expected):
    assert soonest_cert_expiry(inventory(vms), NOW) == expected
