"""`pdmesh sim`: its flags, the workload they describe, and the runs they ask for."""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdmesh.bench.metrics import RequestResult, Slo, max_load_meeting
from pdmesh.bench.trace import TraceScaling, load_trace
from pdmesh.bench.workload import LengthRange
from pdmesh.config import PolicyName, SloConfig
from pdmesh.sim.mesh import MeshSpec
from pdmesh.sim.report import SimReport, print_runs, write_json, write_plot
from pdmesh.sim.run import Run, SearchSettings, search_goodput, simulate
from pdmesh.sim.workload import Shape, SimRequest, at_rate, at_speedup, drawn_shapes, native_rate, trace_shapes
from services.scheduler.profile import BUILTIN, load_profile

EXAMPLES = """Simulate a mesh placing requests with the scheduler's own policies. Examples:

    pdmesh sim --trace ../shared/traces/mooncake_synthetic_trace.jsonl --prefill 8 --decode 8 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 100 --sweep --out sim.json --plot sim.png
    pdmesh sim --rate 2,4,8 --burstiness 0.5 --input-len 1000:8000 --output-len 50:300 ...
    pdmesh sim --gpus 1 --prefill 1 --decode 1 --concurrency 16 --requests 64 --input-len 4096 ...
        (a closed loop, as `pdmesh bench serve --concurrency`; both workers time-slicing one GPU)
    pdmesh sim --profile mesh-profile.json ...   (recorded by `pdmesh bench profile`)
"""


def add_sim_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sim", help="simulate a mesh under a trace with the scheduler's policies",
                       description=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    m = p.add_argument_group("mesh")
    m.add_argument("--profile", default="h100-llama-3.1-8b",
                   help=f"a built-in profile ({', '.join(BUILTIN)}) or a JSON file from `pdmesh bench profile`")
    m.add_argument("--prefill", type=int, default=8, help="simulated prefill workers")
    m.add_argument("--decode", type=int, default=8, help="simulated decode workers")
    m.add_argument("--policy", default="round_robin,least_loaded,slo", help="policies to compare, comma-separated")
    m.add_argument("--no-prior", dest="prior", action="store_false",
                   help="the scheduler starts knowing nothing (default: the profile is its prior)")
    m.add_argument("--candidates", type=int, default=SloConfig.candidates, help="slo: workers forecast per role")
    m.add_argument("--wait-weight", type=float, default=SloConfig.wait_weight,
                   help="slo: compute-ms a ms of a request's extra wait for its first token costs (0: compute alone)")
    m.add_argument("--gpus", type=int, default=0,
                   help="the workers share this many simulated GPUs, placed as `pdmesh up` places them, each "
                        "time-slicing its workers (default: a GPU each)")  # fmt: skip
    m.add_argument("--report-interval-ms", type=float, default=500.0, help="workers' load reports")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", type=Path, default=None, help="a Mooncake-format JSONL trace")
    w.add_argument("--requests", type=int, default=None, help="requests per run (default: the trace's, or 1000)")
    w.add_argument("--trace-input-scale", type=float, default=1.0, help="prompt lengths and block size x this")
    w.add_argument("--trace-output-scale", type=float, default=1.0, help="output lengths x this")
    w.add_argument("--input-len", default="1024", help="without --trace: N or LOW:HIGH")
    w.add_argument("--output-len", default="128", help="without --trace: N or LOW:HIGH")
    w.add_argument("--block-tokens", type=int, default=512, help="without --trace: prefix block size")
    load = p.add_argument_group("load (the trace's own arrivals by default)")
    load.add_argument("--trace-speedup", default=None, help="replay the trace's arrivals this much faster: 1,2,4")
    load.add_argument("--rate", default=None, help="Poisson/gamma arrivals at these requests/s: 1,2,4")
    load.add_argument("--burstiness", type=float, default=1.0, help="--rate: gamma shape; 1 is Poisson")
    load.add_argument("--concurrency", default=None,
                      help="a closed loop instead: this many requests in flight, the next sent as one ends: 1,8,16")
    load.add_argument("--sweep", action="store_true", help="search each policy's goodput (DistServe)")
    s = p.add_argument_group("SLOs and output")
    s.add_argument("--slo-ttft-ms", type=float, required=True, help="TTFT target, sent with every request")
    s.add_argument("--slo-tpot-ms", type=float, required=True, help="TPOT target, sent with every request")
    s.add_argument("--attainment", type=float, default=90.0, help="goodput: %% of requests meeting both SLOs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None, help="JSON results")
    s.add_argument("--plot", type=Path, default=None, help="PNG: attainment against rate, a line per policy")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_sim_command)


def run_sim_command(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=200)  # a log file: the table whole, not squeezed to 80
    try:
        report = _run(args, console)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    print_runs(report, console)
    if args.out is not None:
        write_json(report, args.out)
        console.print(f"wrote {args.out}")
    if args.plot is not None:
        write_plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _run(args: argparse.Namespace, console: Console) -> SimReport:
    policies = [_policy(name) for name in args.policy.split(",") if name.strip()]
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot: needs matplotlib; pip install 'pdmesh[bench]' (or matplotlib)")
    shapes, block = _shapes(args)
    workload, unit, loads, rate_of = _load_model(args, shapes)
    closed = args.concurrency is not None
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    spec = MeshSpec(
        load_profile(args.profile), args.prefill, args.decode, block,
        SloConfig(
            default_ttft_ms=args.slo_ttft_ms, default_tpot_ms=args.slo_tpot_ms, candidates=args.candidates,
            wait_weight=args.wait_weight,
        ),
        use_prior=args.prior, report_interval_s=args.report_interval_ms / 1000, seed=args.seed, gpus=args.gpus,
    )  # fmt: skip
    if args.gpus < 0:
        raise ValueError("--gpus: a count of GPUs; 0 (the default) gives every worker its own")
    if min(args.prefill, args.decode) < 0 or args.decode < 1:
        raise ValueError("--decode: the mesh needs at least one decode worker (and no negative counts)")
    report = SimReport(_command(), spec, slo, args.attainment, unit, [], {}, time.time())
    with _progress(console, args.progress) as progress:
        for policy in policies:

            def run(load: float, policy: PolicyName = policy) -> Run:
                requests = workload(load)
                bar = progress(f"{policy.value} @ {load:.3g}", len(requests))
                return simulate(spec, policy, load, requests, slo, bar, int(load) if closed else 0)

            if args.sweep:
                best, runs = search_goodput(run, SearchSettings(loads[0], args.attainment))
            else:
                runs = [run(load) for load in loads]
                best = max_load_meeting([(r.load, r.attainment_pct) for r in runs], args.attainment)
            report.runs += runs
            if closed:  # a closed loop's rate is what the run achieved
                rate_of = {r.load: r.rate for r in runs}.__getitem__
            report.goodput[policy.value] = None if best is None else rate_of(best)
    return report


def _policy(name: str) -> PolicyName:
    try:
        return PolicyName(name.strip())
    except ValueError:
        raise ValueError(f"--policy: {name!r} is not one of {', '.join(p.value for p in PolicyName)}") from None


def _shapes(args: argparse.Namespace) -> tuple[list[Shape], int]:
    if args.trace is None:
        n = args.requests or 1000
        inputs = LengthRange.parse(args.input_len, "--input-len")
        outputs = LengthRange.parse(args.output_len, "--output-len")
        return drawn_shapes(n, inputs, outputs, args.block_tokens, args.seed), args.block_tokens
    if not args.trace.is_file():
        raise ValueError(f"--trace: {args.trace} is not a file; pass a Mooncake-format JSONL trace")
    records = load_trace(args.trace)
    scaling = TraceScaling(args.trace_input_scale, args.trace_output_scale)
    return trace_shapes(records, scaling, args.requests or len(records)), scaling.block_tokens()


def _load_model(
    args: argparse.Namespace, shapes: list[Shape]
) -> tuple[Callable[[float], list[SimRequest]], str, list[float], Callable[[float], float]]:
    """(load value -> requests, the unit, the loads asked for (a sweep's start first), load -> rate)."""
    if args.concurrency is not None:
        if args.sweep or args.rate is not None or args.trace_speedup is not None:
            raise ValueError("--concurrency: a closed loop; drop --sweep, --rate and --trace-speedup")
        counts = _numbers(args.concurrency, "--concurrency")
        if any(c != int(c) for c in counts):
            raise ValueError(f"--concurrency: {args.concurrency!r} must list whole numbers, e.g. 1,8,16")
        return (lambda _: at_speedup(shapes, 1.0)), "in flight", counts, (lambda c: c)
    if args.rate is not None or args.trace is None:
        loads = _numbers(args.rate or "1", "--rate")
        return (lambda r: at_rate(shapes, r, args.burstiness, args.seed)), "requests/s", loads, (lambda r: r)
    native = native_rate(shapes)
    loads = _numbers(args.trace_speedup or "1", "--trace-speedup")
    return (lambda x: at_speedup(shapes, x)), "x trace speed", loads, (lambda x: x * native)


def _numbers(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a comma-separated list of numbers, e.g. 1,2,4") from None
    if not values or any(v <= 0 or math.isinf(v) for v in values):
        raise ValueError(f"{name}: {text!r} must list positive, finite numbers, e.g. 1,2,4")
    return values


class _progress:
    """A bar per run on a terminal, a line per finished run elsewhere (a log file)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        columns = (TextColumn("{task.description:>24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar = Progress(*columns, console=console, disable=not self.live, transient=False)

    def __enter__(self) -> Callable[[str, int], Callable[[RequestResult], None]]:
        self._bar.__enter__()
        return self._task

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def _task(self, label: str, total: int) -> Callable[[RequestResult], None]:
        task = self._bar.add_task(label, total=total)
        done = 0
        started = time.monotonic()

        def advance(result: RequestResult) -> None:
            nonlocal done
            done += 1
            self._bar.advance(task)
            if self.enabled and not self.live and done == total:
                self.console.print(f"{label}: {total} requests simulated in {time.monotonic() - started:.1f} s")

        return advance


def _command() -> str:
    import shlex
    import sys

    return shlex.join(["pdmesh", *sys.argv[1:]])
