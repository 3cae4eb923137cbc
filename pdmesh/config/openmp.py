"""The OpenMP setting a service process gets before torch loads libgomp: how many times an idle
OpenMP thread spins waiting for the next parallel region before it sleeps on a futex.

Why set it: a CPU step is a few hundred parallel regions with a little serial Python between
them. libgomp's own default (300,000 spins, a few milliseconds) holds a core long after a step,
and on a machine whose cores are also wanted by others (the mesh's scheduler, KV store and
clients; other tenants) a thread spinning while its step's master is preempted stalled a
256-token prefill on two threads from ~175 ms to a median 1,450 ms. 100 is the count a worker
ran with until now (libgomp's own count once it manages more threads than cores, which a stray
second OpenMP pool caused; engine.cpu_threads.one_thread_here). Longer spinning (20,000) made
the engine alone faster on a quiet machine but the live mesh slower, its pool thread spinning on
the core the rest of the mesh needs (BENCHMARKS.md, "OpenMP pools and spinning"). A
GOMP_SPINCOUNT already in the environment is kept.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

GOMP_SPINCOUNT = "GOMP_SPINCOUNT"
DEFAULT_SPINCOUNT = 100


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Before torch is imported (libgomp reads its settings once, when it loads)."""
    env = os.environ if environ is None else environ
    env.setdefault(GOMP_SPINCOUNT, str(DEFAULT_SPINCOUNT))
