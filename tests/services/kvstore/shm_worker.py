"""A worker killed mid-transfer, as a process: it maps the store's memory, takes an offer's slots
and pins a fetch's blocks over shared memory, says so, and waits to be SIGKILLed, never committing
nor releasing. Run by test_shared_memory.py: `python shm_worker.py STORE_ADDRESS LEASE_MS`."""

from __future__ import annotations

import sys
import time

from store_process import TOKENS_KILLED, SharedUser

if __name__ == "__main__":
    address, lease_s = sys.argv[1], int(sys.argv[2]) / 1000
    user = SharedUser(address)
    hashes = user.chain(TOKENS_KILLED)
    fetched, offered = hashes[:2], hashes[2:4]
    generations = user.run(user.client.lookup(fetched))
    assert len(generations) == 2, generations
    slots, _ = user.pin(fetched, generations, lease_s)
    offer = user.offer(offered, [0, 1], lease_s, commit=False)
    print(f"holding {len(slots)} pinned, {len(offer.slots)} offered", flush=True)
    time.sleep(600)
