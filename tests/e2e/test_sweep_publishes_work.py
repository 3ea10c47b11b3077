"""The sweep plans; the fleet works (issue 16), through the sandbox: a scheduled tick's sweep publishes
a due renewal to the events topic (Pub/Sub emulator), and the events function, running under
functions-framework behind its push subscription, does it."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from cryptography import x509

from meshjoin import pki

from .conftest import bound, running_sandbox, wait_for

NAME = "sw-renew"
TTL_SETTINGS = {
    "MESHJOIN_CERT_TTL": "2m",
    "MESHJOIN_RENEW_FRACTION": "0.5",
    "MESHJOIN_RENEW_JITTER": "0.05",
    "MESHJOIN_KEY_ROTATION_RENEWALS": "0",  # a renewal alone: no key rotation follows it
}


def test_a_due_renewal_is_published_and_the_events_function_renews(tmp_path_factory):
    with running_sandbox(tmp_path_factory.mktemp("sweep-publishes"), TTL_SETTINGS, bindings=[bound(NAME)]) as world:
        world.meshjoin("sandbox", "create-vm", NAME, "--service-account",
                       f"{NAME}@meshjoin-sandbox.iam.gserviceaccount.com", "--label", "mesh=join")
        first = world.join_confirmed(NAME)
        not_before = datetime.fromisoformat(first["certNotBefore"].replace("Z", "+00:00"))
        not_after = datetime.fromisoformat(first["certNotAfter"].replace("Z", "+00:00"))
        due = pki.renewal_time(not_before, not_after, renew_fraction=0.5, jitter_fraction=0.05,
                               jitter_key=f"{world.project}/{world.zone}/{NAME}")
        time.sleep(max(0.0, (due - datetime.now(timezone.utc)).total_seconds()) + 1)

        def sweeps() -> list[dict]:
            return [e for e in world.function_log("maintenance_fn") if e.get("outcome") == "swept"]

        before = len(sweeps())
        world.meshjoin("sandbox", "tick")
        summary = wait_for(lambda: len(sweeps()) > before and sweeps()[before], timeout=60,
                           what="the sweep's summary line")
        assert summary["mode"] == "published" and summary["published_renew"] >= 1, summary
        assert summary["renewed"] == 0 and summary["publish_failed"] == 0, summary

        # The events function received the sweep's message (work=renew, this sweep's id) and renewed.
        def renewal_line():
            return next((e for e in world.function_log("events_fn") if e.get("instance") == NAME
                         and e.get("outcome") == "renewed"), None)

        line = wait_for(renewal_line, timeout=60, what="the events function's renewal of the VM")
        assert line["work"] == "renew" and line["sweep"] == summary["sweep"], line
        renewed = world.status(NAME)
        assert renewed["certSerial"] != first["certSerial"] and renewed["certNotAfter"] > first["certNotAfter"]
        # The sweep itself did no per-VM work on the VM: its own log names the VM nowhere (a renewal in the
        # maintenance function would log `renewed` and the metadata write for it).
        assert [e for e in world.function_log("maintenance_fn") if e.get("instance") == NAME] == []
        # The VM's own agent (its watcher) installs the renewed chain; the VM stays joined.
        def installed() -> bool:
            chain = world.certs(NAME)["cert-chain.pem"]
            return bool(chain) and format(x509.load_pem_x509_certificates(chain.encode())[0].serial_number,
                                          "x") == renewed["certSerial"]

        wait_for(installed, timeout=60, what="the renewed certificate installed on the VM")
        assert world.status(NAME)["state"] == "joined" and len(world.entries_for(NAME)) == 1
