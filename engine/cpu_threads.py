"""How many CPU threads each step's forward pass gets: one for small steps, all for the rest.

Why: in a live mesh the decode worker's step shares the machine's cores with its own event loop
and gRPC threads, the scheduler relaying every token, the KV store and the clients. With two
OpenMP threads on a two-core machine, any of those that wakes takes a core from one of the
threads, and the other waits for it at the next barrier (a decode step at batch 1 crosses a few
hundred): at concurrency 1 the step thread ran for about half of its step's wall time, and a
token took ~21 ms against ~17 ms on one thread (BENCHMARKS.md, "Where a c1 token goes"). Alone,
two threads are only ~7% faster than one at batch 1: the weights' read, not arithmetic, bounds a
one-row step. Larger steps (decode batches, prompt chunks) do enough arithmetic per barrier for
the second thread to pay, so they keep the configured count. vLLM's CPU backend gets the same
effect by binding its one OpenMP thread to a core and leaving the other to the rest of the server.

The count is set per step on the step thread (OpenMP keeps it per thread); changing it only
changes how many of the pool's threads join the next parallel region.
"""

from __future__ import annotations

import torch


class CpuThreads:
    """Sets the calling thread's torch thread count for each step, changing it only when it differs."""

    def __init__(self, threads: int, one_thread_max_tokens: int, enabled: bool = True) -> None:
        self.threads = max(1, threads)  # for steps above the cutoff
        self.one_thread_max_tokens = one_thread_max_tokens  # 0: every step gets `threads`
        self.enabled = enabled  # False: leave the count alone (not a CPU engine)
        self._current = 0  # what this thread was last set to; 0: not yet

    @classmethod
    def for_device(cls, device: torch.device, one_thread_max_tokens: int) -> CpuThreads:
        """For an engine on `device`, built after from_config set the thread count (or not)."""
        return cls(torch.get_num_threads(), one_thread_max_tokens, enabled=device.type == "cpu")

    def fit(self, num_tokens: int) -> int:
        """Before a step of `num_tokens` tokens (decodes + prompt chunk tokens): returns the count."""
        if not self.enabled:
            return self._current
        want = 1 if num_tokens <= self.one_thread_max_tokens else self.threads
        if want != self._current:
            torch.set_num_threads(want)
            self._current = want
        return want
