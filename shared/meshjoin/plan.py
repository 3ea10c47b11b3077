"""What one VM needs, decided from facts alone: why it needs a certificate, and what a pass did. Pure.

The vocabulary is typed: a `Cause` carries the sentence the VM owner reads in its status (the same words
as ever), a `Verb` is the past-tense outcome a log line and the CLI report.
"""

from __future__ import annotations

from enum import StrEnum


class Verb(StrEnum):
    """What one reconcile (or a sweep's own work) did: a log line's `outcome`."""

    REGISTERED = "registered"  # the VM confirmed: its WorkloadEntry exists
    BOOTSTRAPPED = "bootstrapped"  # first items written, waiting for the VM's key
    DELIVERED = "delivered"  # a certificate delivered, waiting for the VM to confirm it
    RECHECKED = "rechecked"  # still waiting, nothing new from the VM
    RENEWED = "renewed"
    REISSUED = "reissued"
    ROTATED = "rotated"
    MIGRATED = "migrated"
    MIGRATING = "migrating"
    REFRESHED = "refreshed"
    UNCHANGED = "unchanged"
    STOPPED = "stopped"
    LEFT = "left"
    DENIED = "denied"
    IGNORED = "ignored"
    FAILED = "failed"
    # The sweep's own work (not a reconcile's).
    PRUNED = "pruned"
    DEFERRED = "deferred"


class Cause(StrEnum):
    """Why a VM needs a certificate now. The value is the sentence its owner reads."""

    NO_CERT = "no certificate delivered yet"
    RECREATED = "the VM was recreated or cloned (its instance id changed)"
    IDENTITY_CHANGED = "the identity changed"
    NEW_KEY = "the VM presents a new key"
    FORCED = "an operator forced a new certificate"
    CA_CHANGED = "the CA changed"
    RENEWAL_DUE = "the certificate reached its renewal point"

    @property
    def first_delivery(self) -> bool:
        """Starts the VM's confirmation anew (a new VM, a copy of one, or a new identity)."""
        return self in (Cause.NO_CERT, Cause.RECREATED, Cause.IDENTITY_CHANGED)

    @property
    def same_key(self) -> bool:
        """Re-certifies the key already certified (the VM need not act)."""
        return self in (Cause.IDENTITY_CHANGED, Cause.FORCED, Cause.CA_CHANGED, Cause.RENEWAL_DUE)

    @property
    def verb(self) -> Verb:
        """What certifying for this cause did, for a VM that stays joined."""
        return _VERB_BY_CAUSE.get(self, Verb.DELIVERED)


_VERB_BY_CAUSE = {Cause.RENEWAL_DUE: Verb.RENEWED, Cause.FORCED: Verb.RENEWED, Cause.CA_CHANGED: Verb.REISSUED,
                  Cause.NEW_KEY: Verb.ROTATED}
