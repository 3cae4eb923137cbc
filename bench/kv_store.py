"""The KV store's two benchmarks, each an A/B on one mesh in one run:

  turn2    TTFT of a long conversation's second turn when it lands on the other prefill worker:
           with the KV store (the prefix is fetched from it) against without (the store is
           killed for that conversation, so the prefix is recomputed). Arms alternate, A B A B.
  routing  a shared-prefix workload through `pdmesh bench serve` under `prefix_aware` against
           `least_loaded` (the scheduler is restarted with the other policy between runs; both
           with the store; each run draws its own prompts, so no run hits another's prefixes).

    python bench/kv_store.py                                   # CPU, the embedded SmolLM2
    python bench/kv_store.py --device cuda --model /tmp/llama8b-random --kv-blocks 2048 \\
        --store-mib 8192 --rounds 2 --routing-rounds 1 --concurrency 8 --requests 32 --out kv.json

The mesh: 2 prefill + 1 decode workers and a KV store (`pdmesh up`'s processes), every prompt
prefilled on a prefill worker. Every sample records where its prompt's KV came from (Usage), so
an arm that did not do what it says (a with-store turn that fetched nothing) shows in the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from pdmesh.client import Client, Completion  # noqa: E402
from pdmesh.process_output import Echo, ProcessOutput  # noqa: E402
from pdmesh.up import KVSTORE_ID, Mesh, MeshSpec  # noqa: E402

ROUTING_POLICIES = ("prefix_aware", "least_loaded")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU)")
    p.add_argument("--kv-blocks", type=int, default=1024, help="each worker's KV blocks (16 tokens each)")
    p.add_argument("--store-mib", type=int, default=2048, help="the KV store's memory tier")
    p.add_argument("--port", type=int, default=33400)
    p.add_argument("--block-size", type=int, default=16, help="the workers' KV block size (the default's)")
    p.add_argument("--phases", default="turn2,routing")
    p.add_argument("--vocab-size", type=int, default=32000, help="turn2's random prompts take ids below this")
    # turn2
    p.add_argument("--shared", type=int, default=8000, help="turn 1's prompt: the conversation so far")
    p.add_argument("--new", type=int, default=64, help="turn 2's new message")
    p.add_argument("--output", type=int, default=16, help="tokens each turn generates")
    p.add_argument("--rounds", type=int, default=3, help="conversations per arm")
    # routing
    p.add_argument("--routing-rounds", type=int, default=2, help="bench serve runs per policy")
    p.add_argument("--prefix", type=int, default=1024, help="the shared prefix of each prefix group")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--input", type=int, default=64, help="each request's own tokens after its prefix")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--routing-output", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--log-dir", type=Path, default=None)
    return p.parse_args()


def start_mesh(args: argparse.Namespace, log_dir: Path) -> Mesh:
    env = (("PDMESH_SCHEDULER_POLICY", "round_robin"), ("PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS", "0"))
    spec = MeshSpec(
        port=args.port, prefill=2, decode=1, model=args.model, device=args.device,
        threads=args.threads if args.device == "cpu" else None, env=env,
        extra_worker_args=("--kv-blocks", str(args.kv_blocks), "--block-size", str(args.block_size)),
        kvstore_args=("--memory-mib", str(args.store_mib)),
        http_port=None,
    )  # fmt: skip
    mesh = Mesh(spec, output=ProcessOutput(Echo.WARNINGS, log_dir=log_dir))
    mesh.start(600)
    return mesh


def timed(client: Client, prompt: list[int], max_tokens: int) -> tuple[Completion, float]:
    """The completion and the client-side TTFT (ms)."""
    start = time.monotonic()
    first: float | None = None
    chunks = []
    for chunk in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, timeout_s=600):
        if first is None and chunk.token_ids:
            first = time.monotonic()
        chunks.append(chunk)
    return Completion.collect(chunks), ((first or time.monotonic()) - start) * 1000


def stored_blocks(client: Client) -> int:
    return sum(s.num_stored_blocks for s in client.cluster_state().kv_stores)


def wait_stored(client: Client, blocks: int, timeout_s: float = 120) -> None:
    """Until the store has stored `blocks` blocks in all (offers land after each turn)."""
    deadline = time.monotonic() + timeout_s
    while stored_blocks(client) < blocks and time.monotonic() < deadline:
        time.sleep(0.1)


def conversation(client: Client, args: argparse.Namespace, rng: random.Random, vocab: int, store: bool) -> dict:
    shared = [rng.randrange(1, vocab) for _ in range(args.shared)]
    before = stored_blocks(client) if store else 0
    turn1, _ = timed(client, shared, args.output)
    if store:  # the prefill worker's prompt blocks and the decode worker's output blocks
        wait_stored(client, before + (args.shared + args.output - 1) // args.block_size)
    prompt = shared + list(turn1.token_ids) + [rng.randrange(1, vocab) for _ in range(args.new)]
    turn2, ttft_ms = timed(client, prompt, args.output)
    u = turn2.usage
    assert u is not None and turn1.placement is not None and turn2.placement is not None
    return {
        "arm": "store" if store else "no_store", "ttft_ms": ttft_ms, "server_ttft_ms": u.ttft_ms,
        "prompt_tokens": u.prompt_tokens, "computed": u.computed_prompt_tokens,
        "own_cache": u.worker_cached_prompt_tokens, "from_store": u.store_cached_prompt_tokens,
        "prefill_ms": u.prefill_ms, "turn1_worker": turn1.placement.prefill_worker_id,
        "turn2_worker": turn2.placement.prefill_worker_id,
    }  # fmt: skip


def run_turn2(mesh: Mesh, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(8)
    vocab = args.vocab_size
    samples = []
    with Client(mesh.target) as client:
        for i in range(args.rounds):
            for store in (True, False) if i % 2 == 0 else (False, True):
                if not store:
                    mesh.kill(KVSTORE_ID)
                    wait_store_gone(client)
                sample = conversation(client, args, rng, vocab, store)
                print(json.dumps(sample), flush=True)
                samples.append(sample)
                if not store:
                    mesh.restart(KVSTORE_ID, timeout_s=300)
                    time.sleep(2)  # workers hear of it in their next report's answer
    return samples


def wait_store_gone(client: Client, timeout_s: float = 60) -> None:
    """Until the scheduler no longer names a serving store (workers then stop asking it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stores = client.cluster_state().kv_stores
        if not any(s.health is not None and s.health.name == "SERVING" for s in stores):
            return
        time.sleep(0.2)


def run_routing(mesh: Mesh, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    runs = []
    seed = 100
    for i in range(args.routing_rounds):
        for policy in ROUTING_POLICIES if i % 2 == 0 else ROUTING_POLICIES[::-1]:
            mesh.kill("scheduler")  # nothing is in flight between runs
            mesh.restart("scheduler", timeout_s=300, env=(("PDMESH_SCHEDULER_POLICY", policy),))
            seed += 1
            out = out_dir / f"routing-{policy}-{i}.json"
            argv = [
                sys.executable, "-m", "pdmesh", "bench", "serve", "--target", mesh.target,
                "--concurrency", str(args.concurrency), "--requests", str(args.requests),
                "--input-len", str(args.input), "--output-len", str(args.routing_output),
                "--shared-prefix-len", str(args.prefix), "--prefix-groups", str(args.groups),
                "--seed", str(seed), "--warmup", "0", "--no-progress", "--out", str(out),
            ]  # fmt: skip
            with Client(mesh.target) as client:
                fetched_before = sum(s.num_fetched_blocks for s in client.cluster_state().kv_stores)
                subprocess.run(argv, check=True, cwd=HERE, stdout=subprocess.DEVNULL)
                fetched = sum(s.num_fetched_blocks for s in client.cluster_state().kv_stores) - fetched_before
            (run,) = json.loads(out.read_text())["runs"]
            prompt, cached = prompt_counters(mesh)  # the scheduler started with this run: its counts are the run's
            row = {
                "policy": policy, "ok": run["ok"], "failed": run["failed"],
                "out_tok_per_s": run["output_tokens_per_s"], "ttft_ms": run["ttft_ms"],
                "e2e_ms": run.get("e2e_ms"), "duration_s": run["duration_s"], "prompt_tokens": prompt,
                "cached_tokens": cached, "store_tokens": fetched * args.block_size,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            runs.append(row)
    return runs


def prompt_counters(mesh: Mesh) -> tuple[int, int]:
    """The scheduler's prompt tokens and cached prompt tokens since it started (its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{mesh.spec.reach_host}:{mesh.spec.port + 200}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    totals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return int(totals.get("pdmesh:prompt_tokens_total", 0)), int(totals.get("pdmesh:prompt_cached_tokens_total", 0))


def summarize(samples: list[dict], runs: list[dict]) -> None:
    for arm in ("store", "no_store"):
        rows = [s for s in samples if s["arm"] == arm]
        if rows:
            ttft = statistics.median(s["ttft_ms"] for s in rows)
            print(f"turn2 {arm:9s} n={len(rows)} TTFT median {ttft:9.1f} ms  computed "
                  f"{[s['computed'] for s in rows]}  from store {[s['from_store'] for s in rows]}")  # fmt: skip
    pairs = [(a["ttft_ms"], b["ttft_ms"]) for a, b in zip(samples[::2], samples[1::2], strict=False)]
    if pairs:  # each round's two conversations, whichever came first
        ratios = [
            (x if s["arm"] == "no_store" else y) / (y if s["arm"] == "no_store" else x)
            for (x, y), s in zip(pairs, samples[::2], strict=False)
        ]
        print(f"turn2 TTFT without / with the store, per round: {[round(r, 2) for r in ratios]}")
    for policy in ROUTING_POLICIES:
        rows = [r for r in runs if r["policy"] == policy]
        for r in rows:
            t, rate = r["ttft_ms"], r["out_tok_per_s"]
            print(f"routing {policy:13s} ok {r['ok']} failed {r['failed']} out tok/s {rate:.1f} TTFT p50/p90/p99 "
                  f"{t['p50']:.0f}/{t['p90']:.0f}/{t['p99']:.0f} ms in {r['duration_s']:.1f}s; prompt tokens "
                  f"{r['prompt_tokens']}: cached {r['cached_tokens']} (the store's {r['store_tokens']})")  # fmt: skip


def main() -> int:
    args = parse_args()
    phases = set(args.phases.split(","))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="kv_store_bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", flush=True)
    mesh = start_mesh(args, log_dir)
    samples: list[dict] = []
    runs: list[dict] = []
    try:
        if "turn2" in phases:
            samples = run_turn2(mesh, args)
        if "routing" in phases:
            runs = run_routing(mesh, args, log_dir)
    finally:
        mesh.stop()
    summarize(samples, runs)
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "turn2": samples, "routing": runs}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
