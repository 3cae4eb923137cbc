"""Workers SIGKILLed under 64 concurrent requests, on real hardware (issue 13, part 3).

Not a test: a bench that reports. One mesh of 1 prefill + 1 decode worker (`pdmesh up`'s
placement: on two GPUs the prefill worker gets the last GPU, the decode worker GPU 0), then:

  prefill-killed  N requests at once with long-ish prompts; the prefill worker is SIGKILLed while
                  KV is being pushed (the scheduler shows transfers in flight). The prefill worker
                  is then started again for the next scenario.
  decode-killed   N requests at once with long outputs; the decode worker is SIGKILLed once
                  enough streams have tokens (mid-stream).

Each scenario first runs the same requests undisturbed: those tokens, and their logprobs, are the
oracle (float32 by default). Every disturbed request must either finish with exactly the oracle's
tokens, or fail with a clear status (a gRPC code other than UNKNOWN/INTERNAL, with details) within
its deadline, having streamed only a prefix of the oracle's tokens. One exception, reported apart
as near_tie with its figures: float32 still lets a batch's make-up flip a greedy choice between two
tokens whose logits tie to rounding (greedy_compare.py), so a request that parts from the oracle
where both runs' chosen logprobs agree to --tie-nats, having agreed that closely on every token
before, is a near-tie, not a wrong token. Afterwards every surviving worker must report all KV
blocks free, no reservation and no running request. Prints one line per scenario (and one per
request that parts from the oracle); writes JSON to --out; exits 1 if any check fails.

    python bench/two_gpu_failures.py --model /tmp/llama8b-random --device cuda --out failures.json
    python bench/two_gpu_failures.py --model /tmp/tiny --device cpu --concurrent 8   # smoke on CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.greedy_compare import TIE_NATS, diverges, noise_nats  # noqa: E402
from pdmesh.client import AsyncClient, ClusterState  # noqa: E402
from pdmesh.up import KVSTORE_ID, Mesh, MeshSpec  # noqa: E402

UNCLEAR = {"UNKNOWN", "INTERNAL", "OK"}


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token chosen
    code: str = "OK"  # the gRPC status code's name
    details: str = ""
    seconds: float = 0.0


@dataclass
class Scenario:
    name: str
    requests: int
    killed: str
    kill_after_s: float = 0.0
    state_at_kill: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # verdict -> count
    failure_codes: dict[str, int] = field(default_factory=dict)
    example_details: list[str] = field(default_factory=list)
    worst_seconds: float = 0.0
    survivors_idle: bool = False
    survivor_state: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # every request whose tokens part from the oracle's: which, where, and the logprob differences
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    noise_nats: float = 0.0  # the largest |logprob difference| from the oracle over tokens that agree
    with_logprobs: int = 0  # requests whose stream carried one logprob per token, as the oracle's did


async def one(client: AsyncClient, prompt: list[int], max_tokens: int, deadline_s: float, out: Outcome) -> None:
    started = time.monotonic()
    try:
        options = {"max_tokens": max_tokens, "ignore_eos": True, "logprobs": True, "timeout_s": deadline_s}
        async for chunk in client.generate(prompt, **options):
            out.tokens += chunk.token_ids
            out.logprobs += chunk.logprobs
    except grpc.aio.AioRpcError as e:
        out.code, out.details = e.code().name, e.details() or ""
    except Exception as e:  # noqa: BLE001 - anything else is an unclear failure, reported as such
        out.code, out.details = "UNKNOWN", f"{type(e).__name__}: {e}"
    if len(out.logprobs) != len(out.tokens):  # not one per token: no near-tie can be claimed from them
        out.logprobs = []
    out.seconds = time.monotonic() - started


async def run_all(client: AsyncClient, prompts: list[list[int]], max_tokens: int, deadline_s: float) -> list[Outcome]:
    outs = [Outcome() for _ in prompts]
    await asyncio.gather(*(one(client, p, max_tokens, deadline_s, o) for p, o in zip(prompts, outs, strict=True)))
    return outs


async def undisturbed(
    client: AsyncClient, prompts: list[list[int]], max_tokens: int, deadline_s: float
) -> list[Outcome]:
    """The oracle: the same requests, all at once, with nothing killed; each must succeed."""
    outs = await run_all(client, prompts, max_tokens, deadline_s)
    failed = [o for o in outs if o.code != "OK" or len(o.tokens) != max_tokens]
    if failed:
        raise RuntimeError(f"{len(failed)} undisturbed requests failed, e.g. {failed[0].code}: {failed[0].details}")
    return outs


def prompts_of(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randrange(low, high + 1))] for _ in range(n)]


def worker_rows(state: ClusterState, names: set[str] | None = None) -> list[dict[str, Any]]:
    keys = ("worker_id", "num_kv_blocks_free", "num_kv_blocks_total", "num_kv_reservations",
            "num_kv_transfers_in_flight", "num_running_requests", "num_waiting_requests")  # fmt: skip
    return [{k: getattr(w, k) for k in keys} for w in state.workers if names is None or w.worker_id in names]


def idle(row: dict[str, Any]) -> bool:
    return (row["num_kv_blocks_total"] > 0 and row["num_kv_blocks_free"] == row["num_kv_blocks_total"]
            and row["num_kv_reservations"] == 0 and row["num_running_requests"] == 0)  # fmt: skip


async def survivors_settle(client: AsyncClient, names: set[str], timeout_s: float) -> tuple[bool, list[dict]]:
    """Until every named worker reports idle (True) or the timeout (False); its last rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = worker_rows(await client.cluster_state(), names)
        if (len(rows) == len(names) and all(idle(r) for r in rows)) or time.monotonic() > deadline:
            return len(rows) == len(names) and all(idle(r) for r in rows), rows
        await asyncio.sleep(0.2)


def judge(
    scenario: Scenario, outs: list[Outcome], oracle: list[Outcome], deadline_s: float, tie_nats: float = TIE_NATS
) -> None:
    verdicts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for index, (out, want) in enumerate(zip(outs, oracle, strict=True)):
        late = out.seconds > deadline_s + 2.0  # the client's own deadline fires at deadline_s
        verdict = verdict_of(scenario, index, out, want, tie_nats)
        verdicts["late" if late else verdict] += 1
        if out.code != "OK":
            codes[out.code] += 1
            if len(scenario.example_details) < 4 and out.details not in scenario.example_details:
                scenario.example_details.append(out.details[:300])
    scenario.outcomes, scenario.failure_codes = dict(verdicts), dict(codes)
    scenario.worst_seconds = max(o.seconds for o in outs)
    bad = {k: v for k, v in verdicts.items() if k not in ("ok", "near_tie", "failed_clearly")}
    if bad:
        scenario.problems.append(f"requests not ok and not failed clearly: {bad}")


def verdict_of(scenario: Scenario, index: int, out: Outcome, want: Outcome, tie_nats: float) -> str:
    """One request's verdict against the oracle's; a parting from it is recorded in scenario.mismatches."""
    scenario.noise_nats = max(scenario.noise_nats, noise_nats(out.tokens, out.logprobs, want.tokens, want.logprobs))
    scenario.with_logprobs += bool(out.logprobs or not out.tokens) and bool(want.logprobs)
    finished = out.code == "OK"  # a finished request has all of the oracle's tokens, a failed one a prefix
    if not finished and (out.code in UNCLEAR or not out.details):
        return "unclear_failure"
    parted = diverges(out.tokens, out.logprobs, want.tokens, want.logprobs, whole=finished)
    if parted is None:
        return "ok" if finished else "failed_clearly"
    tie = parted.near_tie(tie_nats)
    scenario.mismatches.append({
        "request": index, "code": out.code, "position": parted.position, "near_tie": tie,
        "prefix_nats": parted.prefix_nats, "at_nats": parted.at_nats,
        "tokens": out.tokens, "oracle_tokens": want.tokens,
        "logprobs": out.logprobs, "oracle_logprobs": want.logprobs,
    })  # fmt: skip
    if finished:
        return "near_tie" if tie else "wrong_tokens"
    return "failed_clearly" if tie else "failed_after_wrong_tokens"


async def disturbed(
    client: AsyncClient, mesh: Mesh, scenario: Scenario, prompts: list[list[int]], max_tokens: int,
    deadline_s: float, ready: Any,
) -> list[Outcome]:  # fmt: skip
    """Run the requests, SIGKILL scenario.killed once ready(state, outcomes) says so."""
    outs = [Outcome() for _ in prompts]
    started = time.monotonic()
    tasks = [asyncio.create_task(one(client, p, max_tokens, deadline_s, o)) for p, o in zip(prompts, outs, strict=True)]
    while not all(t.done() for t in tasks):
        state = await client.cluster_state()
        if ready(state, outs):
            scenario.state_at_kill = {
                "workers": worker_rows(state), "requests_done": sum(t.done() for t in tasks),
                "kv_transfers_in_flight": sum(w.num_kv_transfers_in_flight for w in state.workers),
                "requests_with_tokens": sum(bool(o.tokens) for o in outs),
            }  # fmt: skip
            scenario.kill_after_s = time.monotonic() - started
            await asyncio.to_thread(mesh.kill, scenario.killed)
            break
        await asyncio.sleep(0.02)
    else:
        scenario.problems.append("every request finished before the kill: the kill came too late")
    await asyncio.gather(*tasks)
    return outs


async def forget_prompts(mesh: Mesh) -> None:
    """Every process holding KV starts again empty, so the disturbed run computes and pushes its
    prompts as a first sight would. The oracle run had left them in the decode worker's cache and
    the KV store, and with the store reachable over shared memory the decode worker took them
    from there and prefilled the few tokens left itself: no push to kill (seen on two H200s)."""
    names = [n for n in (KVSTORE_ID, "prefill-0", "decode-0") if n in mesh.procs]
    for name in names:
        mesh.kill(name)
    for name in names:  # the store first: the workers map its memory when it registers
        await asyncio.to_thread(mesh.restart, name, 300)


def role_of(state: ClusterState, role: str) -> list[Any]:
    return [w for w in state.workers if w.role is not None and w.role.name == role]


async def scenarios(mesh: Mesh, args: argparse.Namespace) -> list[Scenario]:
    results = []
    async with AsyncClient(mesh.target) as client:
        # 1. The prefill worker dies while its KV is on the wire.
        prompts = prompts_of(args.concurrent, *args.push_prompt, args.vocab, seed=13)
        oracle = await undisturbed(client, prompts, args.push_tokens, args.deadline_s)
        await forget_prompts(mesh)
        # One request of other prompts first, so the restarted workers' KV connection is made
        # before the kill: on two H200s the kill otherwise landed in the first handshake, and
        # nothing was on the wire to lose.
        await undisturbed(client, prompts_of(1, *args.push_prompt, args.vocab, seed=99), 2, args.deadline_s)
        push = Scenario("prefill-killed", len(prompts), "prefill-0")

        first_reservation: list[float] = []

        def pushing(state: ClusterState, outs: list[Outcome]) -> bool:
            # Mid-push: a report shows KV on the wire. Reports are 100 ms apart and a short push can
            # fall between two, so after --push-wait-s of prefill under way, kill anyway (and say so).
            if any(w.num_kv_transfers_in_flight for w in state.workers):
                return True
            if any(w.num_kv_reservations for w in state.workers) and not first_reservation:
                first_reservation.append(time.monotonic())
            return bool(first_reservation) and time.monotonic() - first_reservation[0] > args.push_wait_s

        outs = await disturbed(client, mesh, push, prompts, args.push_tokens, args.deadline_s, pushing)
        judge(push, outs, oracle, args.deadline_s, args.tie_nats)
        push.survivors_idle, push.survivor_state = await survivors_settle(client, {"decode-0"}, 60)
        results.append(push)
        report(push)
        if mesh.procs["prefill-0"].poll() is not None:
            await asyncio.to_thread(mesh.restart, "prefill-0", 300)

        # 2. The decode worker dies while it streams.
        prompts = prompts_of(args.concurrent, *args.stream_prompt, args.vocab, seed=17)
        oracle = await undisturbed(client, prompts, args.stream_tokens, args.deadline_s)
        stream = Scenario("decode-killed", len(prompts), "decode-0")
        enough = max(1, args.concurrent // 4)

        def streaming(state: ClusterState, outs: list[Outcome]) -> bool:
            return sum(len(o.tokens) >= 8 for o in outs) >= enough

        outs = await disturbed(client, mesh, stream, prompts, args.stream_tokens, args.deadline_s, streaming)
        judge(stream, outs, oracle, args.deadline_s, args.tie_nats)
        stream.survivors_idle, stream.survivor_state = await survivors_settle(client, {"prefill-0"}, 60)
        results.append(stream)
        report(stream)
    for s in results:
        if not s.survivors_idle:
            s.problems.append(f"survivor not idle: {s.survivor_state}")
    return results


def report(s: Scenario) -> None:
    print(f"{s.name}: {s.requests} requests, {s.killed} killed after {s.kill_after_s:.2f}s "
          f"({s.state_at_kill.get('requests_done')} done, {s.state_at_kill.get('requests_with_tokens')} streaming); "
          f"outcomes {s.outcomes} codes {s.failure_codes}; slowest {s.worst_seconds:.1f}s; "
          f"survivor idle {s.survivors_idle}; logprobs for {s.with_logprobs}, noise {s.noise_nats:.2e} nats",
          flush=True)  # fmt: skip
    for m in s.mismatches:
        kind = "near-tie" if m["near_tie"] else "WRONG"
        print(f"  request {m['request']} ({m['code']}) parts from the oracle at token {m['position']}: {kind}, "
              f"{m['prefix_nats']:.2e} nats before, {m['at_nats']:.2e} there", flush=True)  # fmt: skip
    for d in s.example_details:
        print(f"  e.g. {d}", flush=True)


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", help="float32: batching flips a greedy token only at a near-tie")
    p.add_argument("--tie-nats", type=float, default=TIE_NATS, help="a near-tie's largest logprob difference")
    p.add_argument("--kv-blocks", type=int, default=4096)
    p.add_argument("--port", type=int, default=52051)
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--vocab", type=int, default=100000, help="prompt token ids below this")
    p.add_argument("--push-prompt", type=_range, default=(256, 768), help="prefill-killed prompt tokens LOW:HIGH")
    p.add_argument("--push-tokens", type=int, default=16)
    p.add_argument("--push-wait-s", type=float, default=2.0, help="kill after this long if no push is seen")
    p.add_argument("--stream-prompt", type=_range, default=(64, 256), help="decode-killed prompt tokens LOW:HIGH")
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--deadline-s", type=float, default=60.0, help="each request's deadline")
    p.add_argument("--worker-arg", action="append", default=[], help="extra `pdmesh serve` worker argument")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    spec = MeshSpec(
        port=args.port, prefill=1, decode=1, model=args.model, device=args.device,
        extra_worker_args=("--dtype", args.dtype, "--kv-blocks", str(args.kv_blocks), *args.worker_arg),
        env=(("PDMESH_SCHEDULER_REPORT_INTERVAL_MS", "100"), ("PDMESH_SCHEDULER_POLICY", "least_loaded")),
        http_port=None,
    )  # fmt: skip
    mesh = Mesh(spec)
    started = time.monotonic()
    mesh.start(300)
    print(f"mesh up after {time.monotonic() - started:.0f}s", flush=True)
    try:
        results = asyncio.run(scenarios(mesh, args))
    finally:
        mesh.stop()
    problems = [f"{s.name}: {p}" for s in results for p in s.problems]
    if args.out is not None:
        payload = {"command": " ".join(sys.argv), "scenarios": [asdict(s) for s in results], "problems": problems}
        args.out.write_text(json.dumps(payload, indent=2))
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems), flush=True)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
