"""What a ticket pays for the connection it dials: the first push to a fresh peer, cold (the push
dials: UCX endpoint and handshake) against preconnected (KVTransport.preconnect made the
connection before the push opened), alternated round by round, each round a fresh pair of
processes (tests/kvtransfer/kv_peer.py: real transports, UCX over tcp on loopback; on a GPU
machine pass --device cuda for the CUDA IPC path). Times from the first push_layer until the
sender hears that every layer landed (KVPush.wait); the second push of each round, over the
connection then open, is the warm reference.

    python bench/first_ticket.py --rounds 6 --tokens 512 --out first_ticket.json   # CPU
    python bench/first_ticket.py --rounds 6 --tokens 4096 --device cuda            # one GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kvtransfer")]

from kv_peer import SMOLLM2 as LAYOUT  # noqa: E402
from kv_peer import PeerSpec, start_peers  # noqa: E402


def one_round(warm: bool, tokens: int, device: str) -> tuple[float, float]:
    """(first push s, second push s) between a fresh pair of processes."""
    tls = "cuda_ipc,cuda_copy,sm,tcp,self" if device == "cuda" else "tcp,self"
    blocks = 2 * tokens // LAYOUT["block_size"] + 4
    decode, prefill = start_peers(
        PeerSpec(LAYOUT, blocks, device=device, ucx_tls=tls),
        PeerSpec(LAYOUT, blocks, receive=False, device=device, ucx_tls=tls),
    )
    try:
        if warm:
            deadline = time.monotonic() + 30
            while prefill.call("connections")["peers"] != [decode.address]:
                assert time.monotonic() < deadline, "no connection within 30 s"
                prefill.call("preconnect", peers=[decode.address])
                time.sleep(0.05)
        times = []
        for n in range(2):
            info = decode.call("expect", ticket=f"t{n}", num_tokens=tokens, seed=n, timeout_s=30.0)
            pushed = prefill.call("push", infos=[info], seeds=[n], layers=None, timeout_s=30.0)
            assert pushed["tickets"][f"t{n}"]["ok"], pushed
            assert decode.call("wait", tickets=[f"t{n}"], timeout_s=30.0)["tickets"][f"t{n}"]["exact"]
            times.append(pushed["seconds"])
        assert prefill.call("connections")["dials"] == 1
        return times[0], times[1]
    finally:
        decode.stop()
        prefill.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"cold": [], "preconnected": []}
    for r in range(args.rounds):
        order = ("cold", "preconnected") if r % 2 == 0 else ("preconnected", "cold")
        for name in order:
            first, second = one_round(name == "preconnected", args.tokens, args.device)
            runs[name].append((first, second))
            line = f"first push {first * 1000:7.2f} ms, second {second * 1000:7.2f} ms"
            print(f"round {r + 1} {name:>12}: {line}", flush=True)
    summary = {
        name: {
            "first_ms_median": round(statistics.median(f for f, _ in rows) * 1000, 2),
            "second_ms_median": round(statistics.median(s for _, s in rows) * 1000, 2),
        }  # fmt: skip
        for name, rows in runs.items()
    }
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
