"""How many CPU threads each step's forward pass gets: small steps leave a core to the rest.

Why: in a live mesh the decode worker's steps share the machine's cores with the worker's own
event loop and gRPC threads, the scheduler relaying every token, the KV store and the clients.
With as many OpenMP threads as cores, whichever of those wakes takes a core from one of the
threads, and the others wait for it at the next barrier (a decode step crosses a few hundred).
On the two-core machine, colocated mesh, concurrency 1, the step thread ran ~70% of its step's
wall time on two threads and a token took 20-24 ms, against ~17 ms on one thread; at
concurrency 8 and 32 one thread was faster too (BENCHMARKS.md, "Where a c1 token goes"). Alone,
two threads are only ~7% faster than one at batch 1: a small step is bound by reading the
weights, not by arithmetic. Prompt chunks do enough arithmetic between barriers that every core
pays, so steps above the cutoff keep the configured count. vLLM's CPU backend does the same with
its one OpenMP thread bound to a core and the other core left to the rest of its server.

The count is set per step on the step thread (OpenMP keeps it per thread); changing it only
changes how many of the pool's threads join the next parallel region.
"""

from __future__ import annotations

import torch


class CpuThreads:
    """Sets the calling thread's torch thread count before each step, only when it changes."""

    def __init__(self, threads: int, small_step_max_tokens: int, enabled: bool = True) -> None:
        self.threads = max(1, threads)  # for steps above the cutoff
        self.small_threads = max(1, self.threads - 1)  # one core left to the rest of the mesh
        self.small_step_max_tokens = small_step_max_tokens  # 0: every step gets `threads`
        self.enabled = enabled  # False: leave the count alone (not a CPU engine)
        self._current = 0  # what this thread was last set to; 0: not yet

    @classmethod
    def for_device(cls, device: torch.device, small_step_max_tokens: int) -> CpuThreads:
        """For an engine on `device`, built after from_config set the thread count (or not)."""
        return cls(torch.get_num_threads(), small_step_max_tokens, enabled=device.type == "cpu")

    def fit(self, num_tokens: int) -> int:
        """Before a step of `num_tokens` tokens (decodes + prompt chunk tokens): returns the count."""
        if not self.enabled:
            return self._current
        want = self.small_threads if num_tokens <= self.small_step_max_tokens else self.threads
        if want != self._current:
            torch.set_num_threads(want)
            self._current = want
        return want


def one_thread_here() -> None:
    """For a thread other than the step thread that runs torch ops (KV copies, checks): one
    OpenMP thread, so that it never starts an OpenMP pool of its own.

    Why: libgomp decides how long an idle pool thread spins before it sleeps by how many threads
    it manages. Within the process's core count it spins GOMP_SPINCOUNT times; past it, only ~100
    times. A second pool (a loader or transport thread that once ran a large op on two threads)
    put workers past it by accident, so that the spin count depended on which threads had ever
    touched torch. With the step thread's pool the only one, GOMP_SPINCOUNT decides
    (pdmesh.config.openmp sets its default; BENCHMARKS.md, "OpenMP pools and spinning").
    """
    torch.set_num_threads(1)
