"""Fleet view from the store alone: which instance serves which version, and convergence."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .store import CheckpointStore, InstanceRecord, StoreError


@dataclass
class AdapterStatus:
    adapter: str
    active_version: str | None
    pinned: bool
    retired: bool
    served: dict[str, str | None] = field(default_factory=dict)  # alive instance -> version
    errors: dict[str, str] = field(default_factory=dict)  # instance -> last error

    @property
    def converged(self) -> bool:
        """Every alive instance following this adapter serves its active version."""
        if self.retired:
            return all(v is None for v in self.served.values())
        return bool(self.served) and all(v == self.active_version for v in self.served.values())


@dataclass
class FleetStatus:
    instances: list[InstanceRecord]
    adapters: list[AdapterStatus]
    now: float

    def stale(self, record: InstanceRecord) -> bool:
        return record.is_stale(self.now)


def fleet_status(store: CheckpointStore, now: float | None = None) -> FleetStatus:
    now = time.time() if now is None else now
    records = store.instance_records()
    alive = [r for r in records if not r.is_stale(now)]
    adapters = []
    for name in store.adapters():
        try:
            status = AdapterStatus(
                adapter=name,
                active_version=store.active_version(name),
                pinned=store.pinned_version(name) is not None,
                retired=store.is_retired(name),
            )
        except StoreError as exc:
            status = AdapterStatus(
                adapter=name, active_version=None, pinned=False, retired=False, errors={"store": str(exc)}
            )
        for record in alive:
            serving = record.adapters.get(name)
            if serving is None:
                continue
            status.served[record.instance_id] = serving.served_version
            if serving.last_error:
                status.errors[record.instance_id] = serving.last_error
        adapters.append(status)
    return FleetStatus(instances=records, adapters=adapters, now=now)
