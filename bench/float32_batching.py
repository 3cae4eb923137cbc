"""Does the batch alone change greedy tokens in float32? One engine, the same prompts, two batchings.

Not a test: a bench that reports (RELIABILITY.md, "A near-tie or a wrong token"). The engine
runs the prompts of bench/two_gpu_failures.py's prefill-killed scenario three times with its prefix
cache off, so every run computes every prompt: all of them at once (as the oracle run's batches),
then one at a time, then all at once in the reverse order. Nothing moves between processes. For
every prompt whose greedy tokens in a later run differ from the first run's it prints where, the
largest |logprob difference| over the tokens before (float32 noise) and the difference of the two
chosen tokens' logprobs there (a near-tie: both are each run's best).

    python bench/float32_batching.py --model /tmp/llama8b-random --device cuda --out batching.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.greedy_compare import diverges, noise_nats  # noqa: E402
from bench.two_gpu_failures import prompts_of  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

Run = dict[str, tuple[list[int], list[float]]]


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, order: list[int], together: int) -> Run:
    """Each prompt's (tokens, logprobs), added in `order`, `together` at a time, each group run to the end."""
    outs: Run = {}
    for start in range(0, len(order), together):
        for i in order[start : start + together]:
            engine.add_request(f"{start}-{i}", prompts[i], params)
        while engine.has_work():
            for out in engine.step():
                tokens, logprobs = outs.setdefault(out.request_id, ([], []))
                tokens += out.new_token_ids
                logprobs += out.new_logprobs or []
    return {rid.split("-", 1)[1]: v for rid, v in outs.items()}  # keyed by the prompt's index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-blocks", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=100000, help="prompt token ids below this (two_gpu_failures')")
    p.add_argument("--prompt-tokens", default="256:768", help="each prompt's length, LOW:HIGH (two_gpu_failures')")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        cache=CacheConfig(num_blocks=args.kv_blocks, enable_prefix_caching=False),
    )  # fmt: skip
    engine = Engine.from_config(config)
    low, high = (int(n) for n in args.prompt_tokens.split(":"))
    prompts = prompts_of(args.prompts, low, high, args.vocab, seed=13)  # the prefill-killed scenario's, by default
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=True)
    forward = list(range(len(prompts)))
    started = time.monotonic()
    first = run(engine, prompts, params, forward, len(prompts))
    print(f"all at once: {time.monotonic() - started:.0f}s", flush=True)
    payload: dict = {"command": " ".join(sys.argv), "prompts": len(prompts), "arms": {}}
    for arm, order, together in (("one at a time", forward, 1), ("reversed, at once", forward[::-1], len(prompts))):
        started = time.monotonic()
        payload["arms"][arm] = compare(first, run(engine, prompts, params, order, together))
        rows, noise = payload["arms"][arm]["parted"], payload["arms"][arm]["noise_nats"]
        for r in rows:
            print(f"  {arm}: prompt {r['prompt']} parts at token {r['position']}; {r['prefix_nats']:.2e} nats "
                  f"before, {r['at_nats']:.2e} there", flush=True)  # fmt: skip
        print(f"{arm}: {len(rows)} of {len(prompts)} prompts part from the first run; logprob noise where they "
              f"agree {noise:.2e} nats; {time.monotonic() - started:.0f}s", flush=True)  # fmt: skip
        if args.out is not None:
            args.out.write_text(json.dumps(payload, indent=2))


def compare(first: Run, other: Run) -> dict:
    """Every prompt whose tokens part from the first run's, and the noise over those that agree."""
    rows, noise = [], 0.0
    for key, (a, la) in first.items():
        b, lb = other[key]
        noise = max(noise, noise_nats(b, lb, a, la))
        parted = diverges(b, lb, a, la)
        if parted is not None:
            rows.append({"prompt": int(key), "position": parted.position, "prefix_nats": parted.prefix_nats,
                         "at_nats": parted.at_nats, "first": a, "other": b,
                         "first_logprobs": la, "other_logprobs": lb})  # fmt: skip
    return {"parted": sorted(rows, key=lambda r: r["prompt"]), "noise_nats": noise}


if __name__ == "__main__":
    main()
