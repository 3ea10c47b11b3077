"""Small domain objects the core passes around (never SDK types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

JOIN_LABEL = "mesh"
JOIN_VALUE = "join"


# slots: a 100,000-VM sweep holds one VmKey and one Vm per VM (no per-instance __dict__).
@dataclass(frozen=True, order=True, slots=True)
class VmKey:
    """Names one VM. Everything else about it is read from Compute when it is reconciled."""

    project: str
    zone: str
    instance: str

    def __str__(self) -> str:
        return f"{self.project}/{self.zone}/{self.instance}"

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    def log_fields(self) -> dict[str, str]:
        return {"project": self.project, "zone": self.zone, "instance": self.instance}


@dataclass(frozen=True, slots=True)
class Vm:
    """What Compute says about a VM right now."""

    key: VmKey
    instance_id: str
    labels: Mapping[str, str]
    metadata: Mapping[str, str]
    metadata_fingerprint: str
    network_ip: str
    service_account: str | None
    status: str = "RUNNING"
    # False for a sweep listing's view: `metadata` holds only the items the planner reads (the VM has
    # more). Such a VM is planned from, never written from: a write merges into the whole metadata.
    metadata_complete: bool = True

    @property
    def wants_mesh(self) -> bool:
        return self.labels.get(JOIN_LABEL) == JOIN_VALUE


@dataclass(frozen=True)
class Identity:
    """The mesh identity a VM is allowed to take, after policy."""

    namespace: str
    service_account: str
    app: str
    version: str
    ports: Mapping[str, int] = field(default_factory=dict)

    def spiffe(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


MAX_REASON = 400  # a reason quotes pieces of the VM owner's input: bounded, whatever they wrote


@dataclass(frozen=True)
class Denial:
    """Why a VM may not join, in words its owner can act on.

    `account_bound` False: the VM's service account is bound to no identity, so meshjoin may not act
    as it and writes nothing at all to the VM (Compute requires actAs to change its metadata).
    """

    reason: str
    account_bound: bool = True

    def __post_init__(self) -> None:
        if len(self.reason) > MAX_REASON:
            object.__setattr__(self, "reason", self.reason[:MAX_REASON - 3] + "...")
