"""What the store reports about itself: plain dataclasses, torch-free, so the scheduler (which
keeps the latest report of each store) and metrics exporters can read them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreCounters:
    """What the store did since it started: plain attributes, read by reports and metrics."""

    lookups: int = 0
    lookup_blocks: int = 0
    lookup_hit_blocks: int = 0
    fetches: int = 0
    fetched_blocks: int = 0
    fetches_refused: int = 0  # a block gone or of another generation: the lookup was stale
    fetches_failed: int = 0  # the push failed (caller gone, lease ran out)
    fetches_in_flight: int = 0
    offers: int = 0
    stored_blocks: int = 0
    demoted_blocks: int = 0  # memory -> disk
    promoted_blocks: int = 0  # disk -> memory, for a fetch
    evicted_blocks: int = 0  # dropped from the store entirely
    restored_blocks: int = 0  # found on disk at start, each under a new generation
    leases: int = 0  # shared-memory fetches and offers under way (a gauge, as fetches_in_flight)
    leases_expired: int = 0  # shared-memory fetches and offers whose worker neither released nor committed


@dataclass(frozen=True)
class StoreStatus:
    memory_capacity_bytes: int = 0  # per namespace
    memory_used_bytes: int = 0
    disk_capacity_bytes: int = 0  # per namespace; 0: no disk tier
    disk_used_bytes: int = 0
    num_namespaces: int = 0
    num_memory_blocks: int = 0
    num_disk_blocks: int = 0
    shared_memory: bool = False  # the memory tier is in /dev/shm: workers of this host map it
    counters: StoreCounters = field(default_factory=StoreCounters)
