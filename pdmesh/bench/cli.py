"""The `pdmesh bench ...` subcommands: their flags, and flags -> BenchPlan."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
from pathlib import Path

from pdmesh.bench.backend import Api, GenerationOptions
from pdmesh.bench.metrics import Slo
from pdmesh.bench.plan import BenchPlan, LoadMode, LoadPoint
from pdmesh.bench.trace import TraceScaling
from pdmesh.bench.workload import LengthRange, PromptKind, RequestClass

DEFAULT_REQUESTS = 64
EXAMPLES = """Load a running mesh and report throughput, latency percentiles and goodput. Examples:

    pdmesh bench serve --target HOST:PORT --concurrency 1,8,32 --requests 64 \\
        --input-len 256 --output-len 64 --out run.json --plot run.png
    pdmesh bench serve --rate 0.5,1,2 --slo-ttft-ms 2000 --slo-tpot-ms 200 ...
    pdmesh bench serve --trace ../shared/traces/mooncake_synthetic_trace.jsonl \\
        --trace-input-scale 0.0625 --trace-speedup 1,2 --requests 200 ...
"""
SCORE_EXAMPLES = """Judge saved `pdmesh bench serve --out` runs at other SLOs, from their per-request records:
per run and SLO pair the share meeting TTFT, TPOT and both, and the goodput (requests/s meeting
both); per sweep DistServe's goodput (the highest load up to which every load tried has --attainment % meeting both).
Every TTFT target is paired with every TPOT target. Examples:

    pdmesh bench score rates.json --slo-ttft-ms 1000,2000,4000 --slo-tpot-ms 50,100
    pdmesh bench score disagg.json coloc.json --slo-ttft-ms 2000 --slo-tpot-ms 100 --out score.json
    pdmesh bench score rate1.json rate2.json rate4.json --combine --slo-ttft-ms 2000 --slo-tpot-ms 100
"""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="measure a running mesh under load")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="load a server: a concurrency or rate sweep, or a trace replay",
                             description=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_serve_flags(serve)
    serve.set_defaults(func=_bench_serve)
    score = kinds.add_parser(
        "score", help="judge saved bench serve runs again at other SLOs", description=SCORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_score_flags(score)
    score.set_defaults(func=_bench_score)
    profile = kinds.add_parser("profile", help="record a live mesh's performance profile (for pdmesh sim)")
    profile.add_argument("--target", default="127.0.0.1:50051", help="the scheduler's host:port")
    profile.add_argument("--out", type=Path, required=True, help="the profile JSON to write")
    profile.add_argument("--name", default=None, help="the profile's name (default: the file's stem)")
    profile.add_argument("--max-prompt", type=int, default=1024, help="the longest calibration prompt, tokens")
    profile.add_argument("--concurrency", default="1,4,8,16", help="decode batch sizes to exercise")
    profile.add_argument("--decode-tokens", type=int, default=32, help="output tokens of each decode-phase request")
    profile.add_argument("--tokenizer", default=None, help="model name or path for the vocabulary")
    profile.add_argument("--vocab-size", type=int, default=None, help="random token ids below this (no tokenizer)")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument(
        "--no-load", dest="drive", action="store_false",
        help="drive no calibration load: read the models fitted so far (after a trace replay: the mesh under it)",
    )  # fmt: skip
    profile.add_argument(
        "--shared-cores", type=float, default=0.0,
        help="the cores the mesh's workers share (a CPU mesh on this host: `nproc`); 0: a device each",
    )  # fmt: skip
    profile.set_defaults(func=_bench_profile)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="--api grpc: the scheduler's host:port")
    p.add_argument("--api", choices=[a.value for a in Api], default=None,
                   help="grpc (pdmesh's door, the default) or openai (any OpenAI-compatible server)")  # fmt: skip
    p.add_argument("--base-url", default=None, help="--api openai: e.g. http://127.0.0.1:8000/v1 (implies openai)")
    p.add_argument("--api-key", default=None, help="--api openai: bearer token, if the server wants one")
    p.add_argument("--model", default="", help="the model name to ask for (default: the server's)")
    load = p.add_argument_group("load (one of)")
    load.add_argument("--concurrency", help="closed loop: requests in flight, a list sweeps: 1,8,32")
    load.add_argument("--rate", help="open loop: arrivals per second, a list sweeps: 1,2,inf")
    load.add_argument("--trace", type=Path, help="replay a Mooncake-format trace (JSONL)")
    load.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests of --rate/--trace")
    load.add_argument("--burstiness", type=float, default=1.0, help="--rate: gamma shape; 1 is Poisson")
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=None,
                   help=f"requests per load point (default {DEFAULT_REQUESTS}; with --trace: its first N, default all)")
    w.add_argument("--input-len", default=None, help="prompt tokens: N or LOW:HIGH (uniform; default 256)")
    w.add_argument("--output-len", default=None, help="output tokens: N or LOW:HIGH (uniform; default 64)")
    w.add_argument("--mix", default=None,
                   help="request classes instead of --input-len/--output-len: IN/OUT[@WEIGHT],..., e.g. "
                        "8192/32,256/1024 (long prompts, short answers among short prompts, long answers)")  # fmt: skip
    w.add_argument("--prompt-kind", choices=[k.value for k in PromptKind], default="tokens",
                   help="random token ids (any model, exact lengths) or text")  # fmt: skip
    w.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of a shared prefix before each prompt's own --input-len")  # fmt: skip
    w.add_argument("--prefix-groups", type=int, default=1, help="distinct shared prefixes (request i takes i mod G)")
    w.add_argument("--tokenizer", default=None, help="model name or path for the vocabulary (default: the served one)")
    w.add_argument("--vocab-size", type=int, default=None, help="token prompts without a tokenizer: ids below this")
    w.add_argument("--trace-speedup", default="1", help="--trace: replay speed factors, a list sweeps: 0.5,1,2")
    w.add_argument("--trace-input-scale", type=float, default=1.0, help="--trace: prompt lengths and block size x this")
    w.add_argument("--trace-output-scale", type=float, default=1.0, help="--trace: output lengths x this")
    w.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals")
    w.add_argument("--warmup", type=int, default=2, help="short uncounted requests before the first point")
    g = p.add_argument_group("generation")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the output length (default on)")  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="request i samples with seed + i")
    g.add_argument("--timeout-s", type=float, default=600.0, help="per request; a late one fails DEADLINE_EXCEEDED")
    s = p.add_argument_group("SLOs and output")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target")
    s.add_argument("--attainment", type=float, default=90.0, help="sweep goodput: %% of requests meeting both SLOs")
    s.add_argument("--send-slo", action="store_true", help="also send the SLO targets with each request")
    s.add_argument("--out", type=Path, default=None, help="JSON results")
    s.add_argument("--plot", type=Path, default=None, help="PNG: latency percentiles and throughput against load")
    s.add_argument("--per-request", action=argparse.BooleanOptionalAction, default=True,
                   help="every request's record in the JSON (default on; pdmesh bench score reads them)")  # fmt: skip
    s.add_argument("--token-times", action="store_true",
                   help="and in each record every output token's arrival (grows with the output lengths)")  # fmt: skip
    s.add_argument("--no-progress", dest="progress", action="store_false")


def _add_score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by pdmesh bench serve --out")
    p.add_argument("--slo-ttft-ms", default=None, help="TTFT targets, a list: 1000,2000")
    p.add_argument("--slo-tpot-ms", default=None, help="TPOT targets, a list: 50,100")
    p.add_argument("--attainment", type=float, default=90.0, help="goodput: %% of requests meeting both SLOs")
    p.add_argument("--combine", action="store_true",
                   help="the files' runs are one sweep (split over invocations), not a sweep each")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON: every score")


def _numbers(text: str, name: str, integer: bool = False) -> tuple[float, ...]:
    try:
        values = tuple(math.inf if v.strip() == "inf" else float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a comma-separated list of numbers, e.g. 1,8,32") from None
    if not values or any(v <= 0 for v in values) or (integer and any(v != int(v) for v in values)):
        kind = "positive whole numbers" if integer else "positive numbers"
        raise ValueError(f"{name}: {text!r} must list {kind}, e.g. 1,8,32")
    return values


def load_points(args: argparse.Namespace) -> tuple[LoadPoint, ...]:
    given = [name for name in ("concurrency", "rate", "trace") if getattr(args, name) is not None]
    if len(given) > 1:
        raise ValueError(f"--{given[0]} and --{given[1]}: choose one load model (use --max-concurrency to cap a rate)")
    if args.trace is not None:
        return tuple(LoadPoint(LoadMode.TRACE, v) for v in _numbers(args.trace_speedup, "--trace-speedup"))
    if args.rate is not None:
        return tuple(LoadPoint(LoadMode.RATE, v) for v in _numbers(args.rate, "--rate"))
    levels = _numbers(args.concurrency or "1", "--concurrency", integer=True)
    if any(math.isinf(v) for v in levels):
        raise ValueError("--concurrency: inf is not a concurrency; use --rate inf to send everything at once")
    return tuple(LoadPoint(LoadMode.CONCURRENCY, v) for v in levels)


def _api_target(args: argparse.Namespace) -> tuple[Api, str]:
    api = Api(args.api) if args.api else Api.OPENAI if args.base_url else Api.GRPC
    if api is Api.GRPC:
        if args.base_url:
            raise ValueError("--base-url: is for --api openai; pdmesh's gRPC door takes --target HOST:PORT")
        return api, args.target
    if not args.base_url or not args.base_url.startswith(("http://", "https://")):
        raise ValueError("--base-url: --api openai needs the server's URL, e.g. http://127.0.0.1:8000/v1")
    return api, args.base_url


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """ValueError names the flag to fix."""
    if args.trace is not None and not args.trace.is_file():
        raise ValueError(f"--trace: {args.trace} is not a file; pass a Mooncake-format JSONL trace")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot: needs matplotlib; pip install 'pdmesh[bench]' (or matplotlib)")
    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests: is {args.requests}; send at least 1")
    if args.shared_prefix_len < 0 or args.prefix_groups < 1:
        raise ValueError("--shared-prefix-len / --prefix-groups: use a length >= 0 and at least 1 group")
    if args.token_times and not args.per_request:
        raise ValueError("--token-times: the token times go in the per-request records; drop --no-per-request")
    if args.mix is not None and (args.input_len is not None or args.output_len is not None):
        raise ValueError("--mix: sets each class's lengths; drop --input-len / --output-len, or drop --mix")
    if args.mix is not None and args.trace is not None:
        raise ValueError("--mix: a trace brings its own lengths; drop --mix with --trace")
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    options = GenerationOptions(
        ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.sampling_seed,
        slo_ttft_ms=slo.ttft_ms if args.send_slo else None, slo_tpot_ms=slo.tpot_ms if args.send_slo else None,
        timeout_s=args.timeout_s, model=args.model,
    )  # fmt: skip
    api, target = _api_target(args)
    return BenchPlan(
        api=api, target=target, api_key=args.api_key, points=load_points(args),
        num_requests=args.requests if args.requests or args.trace else DEFAULT_REQUESTS,
        input_len=LengthRange.parse(args.input_len or "256", "--input-len"),
        output_len=LengthRange.parse(args.output_len or "64", "--output-len"),
        mix=RequestClass.parse_mix(args.mix) if args.mix is not None else (),
        prompt_kind=PromptKind(args.prompt_kind), options=options, slo=slo,
        prefix_len=args.shared_prefix_len, prefix_groups=args.prefix_groups,
        attainment_target_pct=args.attainment, max_concurrency=args.max_concurrency, burstiness=args.burstiness,
        trace=args.trace, trace_scaling=TraceScaling(args.trace_input_scale, args.trace_output_scale),
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed, warmup=args.warmup,
        out=args.out, plot=args.plot, per_request=args.per_request, token_times=args.token_times,
        progress=args.progress,
    )  # fmt: skip


def _bench_serve(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console

    from pdmesh.bench.serve import command_line, run_bench_serve

    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160  # a log file has room for the whole table
    try:
        plan = plan_from_args(args)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    return asyncio.run(run_bench_serve(plan, command_line(sys.argv[1:]), console))


def _bench_profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine.errors import EngineError
    from engine.tokenizer import Tokenizer
    from pdmesh.bench.backend import RequestFailed
    from pdmesh.bench.profile import ProfileLoad, record_profile
    from pdmesh.bench.workload import Vocabulary
    from services.scheduler.profile import save_profile

    console = Console(stderr=True)
    try:
        concurrencies = tuple(int(c) for c in _numbers(args.concurrency, "--concurrency", integer=True))
        if args.max_prompt < 16:
            raise ValueError(f"--max-prompt: is {args.max_prompt}; use at least 16 tokens")
        if args.vocab_size is not None:
            vocab = Vocabulary(args.vocab_size)
        else:
            try:
                vocab = Vocabulary.of(Tokenizer.from_model(args.tokenizer or "smollm2"))
            except (EngineError, OSError) as e:
                raise ValueError(f"--tokenizer: cannot open it ({e}); pass --tokenizer or --vocab-size") from None
        if args.shared_cores < 0:
            raise ValueError(f"--shared-cores: is {args.shared_cores}; use the host's cores, or 0 for a device each")
        load = ProfileLoad(args.max_prompt, concurrencies, args.decode_tokens, args.seed, args.drive, args.shared_cores)
        profile = asyncio.run(record_profile(args.target, args.name or args.out.stem, load, vocab, console))
    except (ValueError, RequestFailed) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    save_profile(profile, args.out)
    console.print(
        f"wrote {args.out}: {profile.step}, {profile.transfer}, noise {profile.step_noise:.2f}, step gap "
        f"{profile.step_gap_ms:.1f} ms, request overhead {profile.request_overhead_ms:.0f} ms, shared cores "
        f"{profile.shared_cores:g}"
    )  # fmt: skip
    return 0


def _bench_score(args: argparse.Namespace) -> int:
    import json
    import sys

    from rich.console import Console

    from pdmesh.bench.score import group_sweeps, load_runs, print_score, score, score_json, slo_pairs
    from pdmesh.bench.serve import command_line

    try:
        if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
            raise ValueError("--slo-ttft-ms / --slo-tpot-ms: give the targets to judge by (either or both, lists)")
        if not 0 < args.attainment <= 100:
            raise ValueError(f"--attainment: is {args.attainment}; a percentage above 0, at most 100")
        ttft = _numbers(args.slo_ttft_ms, "--slo-ttft-ms") if args.slo_ttft_ms is not None else ()
        tpot = _numbers(args.slo_tpot_ms, "--slo-tpot-ms") if args.slo_tpot_ms is not None else ()
        runs = [run for path in args.runs for run in load_runs(path)]
        report = score(group_sweeps(runs, args.combine), slo_pairs(ttft, tpot), args.attainment)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        return 2
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a log file or a pipe has room for the whole table
    print_score(report, console)
    if args.out is not None:
        args.out.write_text(json.dumps(score_json(report, command_line(sys.argv[1:])), indent=2) + "\n")
        Console(stderr=True).print(f"wrote {args.out}")
    return 0
