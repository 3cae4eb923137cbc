"""Where one request's time went: what the scheduler measured and what its workers reported,
added up into the Usage the client gets on the last response."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from services.scheduler.request import Usage


@dataclass
class UsageMeter:
    start: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # when the prompt went to the worker that computes it
    first_token: float | None = None  # when the first token went to the client
    reported: Usage = Usage()  # the workers' figures: cache, queue, prefill, transfer, decode

    def prompt_sent(self) -> None:
        """The prompt is going to the worker that computes it now: scheduling ends here (the
        last time, when a failed attempt is placed again)."""
        self.scheduled = time.monotonic()

    def token_sent(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()

    def prefilled(self, usage: Usage) -> None:
        """A prefill worker's figures (the first token came from it)."""
        self.reported = usage

    def decoded(self, usage: Usage, prefilled_here: bool) -> None:
        """A decode worker's last figures: its decode time; and, when it prefilled the request
        itself, where the prompt's KV came from (and, unless a prefill worker's first token came
        before, its queue and prefill times). It prefilled itself with a local prefill, and after
        a decode failover: the worker taking over prefills prompt and output so far from its own
        cache, the store or by computing, and that KV is what the request finished with; no
        prefill worker's push served it. After a hand-off without failover the prefill worker's
        figures stand: the decode worker imported the prompt, it did not cache it."""
        r = self.reported
        self.reported = dataclasses.replace(r, decode_ms=usage.decode_ms)
        if prefilled_here:
            self.reported = dataclasses.replace(
                self.reported, queue_ms=r.queue_ms or usage.queue_ms, prefill_ms=r.prefill_ms or usage.prefill_ms,
                transferred_prompt_tokens=0, **prompt_sources(usage),
            )  # fmt: skip

    def usage(self, prompt_tokens: int, completion_tokens: int) -> Usage:
        now = time.monotonic()
        return dataclasses.replace(
            self.reported,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_ms=((self.first_token or now) - self.start) * 1000,
            schedule_ms=((self.scheduled or self.first_token or now) - self.start) * 1000,
            e2e_ms=(now - self.start) * 1000,
        )


def prompt_sources(usage: Usage) -> dict[str, int]:
    """Where a worker that prefilled the request itself got the prompt's KV, as Usage fields. A
    worker taking over after a failover counts over prompt and output so far; only the prompt's
    tokens count here, its own cache first (it came first in the sequence), so cached plus
    computed is the prompt."""
    prompt = usage.prompt_tokens
    own = min(usage.worker_cached_prompt_tokens, prompt)
    store = min(usage.store_cached_prompt_tokens, prompt - own)
    return {
        "cached_prompt_tokens": own + store, "worker_cached_prompt_tokens": own,
        "store_cached_prompt_tokens": store, "computed_prompt_tokens": prompt - own - store,
    }  # fmt: skip
