"""`pdmesh bench serve`: a sweep of load points against a running server, end to end.

For each load point: build its requests (its own seed), send them (progress bar), summarise.
Then print the table and write the JSON and the PNG. Returns 0 when the sweep ran (failed
requests are figures, reported, not a crash) and 2 when it could not start (server unreachable,
no tokenizer or vocabulary size for the prompts, a bad trace).
"""

from __future__ import annotations

import shlex
import sys
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.errors import EngineError
from engine.tokenizer import Tokenizer
from pdmesh.bench.backend import Backend, GenerationOptions, RequestFailed, ServerInfo, make_backend
from pdmesh.bench.metrics import RequestResult, summarize
from pdmesh.bench.plan import BenchPlan
from pdmesh.bench.report import PointResult, SweepResult, print_table, write_json, write_plot
from pdmesh.bench.runner import run_point
from pdmesh.bench.workload import BenchRequest, PromptKind, Vocabulary

WARMUP_CONCURRENCY = 4


class SetupError(Exception):
    """The sweep cannot start; the message names the option to fix."""


async def run_bench_serve(plan: BenchPlan, command: str, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    try:
        async with make_backend(plan.api, plan.target, plan.api_key) as backend:
            server = await backend.describe()
            vocab = vocabulary(plan, server)
            sweep = SweepResult(plan, command, server, time.time(), [])
            console.print(f"[bold]{plan.target}[/bold]: {server.model}, {server.detail}")
            await warm_up(backend, plan, vocab)
            for i, point in enumerate(plan.points):
                requests = plan.requests(i, vocab)
                warn_if_too_long(requests, server, console)
                if (cap := plan.max_in_flight(point)) and len(requests) < cap:
                    console.print(f"[yellow]warning:[/yellow] {len(requests)} requests never reach {cap} in flight; "
                                  "raise --requests")  # fmt: skip
                results = await _run_with_progress(backend, plan, i, requests, console)
                sweep.points.append(PointResult(point, summarize(results, plan.slo), results))
                if plan.out is not None:
                    write_json(sweep, plan.out)  # after every point: a long sweep cut short keeps its figures
    except (SetupError, RequestFailed, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    print_table(sweep, console)
    if plan.out is not None:
        console.print(f"wrote {plan.out}")
    if plan.plot is not None:
        write_plot(sweep, plan.plot)
        console.print(f"wrote {plan.plot}")
    return 0


def vocabulary(plan: BenchPlan, server: ServerInfo) -> Vocabulary:
    """The ids random prompts draw from: the tokenizer's (given, or the served model's when it is
    a name or path this machine can open), else --vocab-size for token prompts."""
    if plan.vocab_size is not None and plan.prompt_kind is PromptKind.TOKENS:
        return Vocabulary(plan.vocab_size)
    name = plan.tokenizer or server.model
    try:
        return Vocabulary.of(Tokenizer.from_model(name))
    except (EngineError, OSError) as e:
        raise SetupError(
            f"--tokenizer: cannot open the tokenizer of {name!r} here ({e}); pass --tokenizer with the "
            "served model's directory or file, or --vocab-size N for random token prompts"
        ) from None


async def warm_up(backend: Backend, plan: BenchPlan, vocab: Vocabulary) -> None:
    """A few short requests before the first point, not counted (first-use costs on the server)."""
    if plan.warmup <= 0:
        return
    options = GenerationOptions(ignore_eos=True, timeout_s=plan.options.timeout_s, model=plan.options.model)
    requests = [BenchRequest(i, vocab.random_ids(_rng(plan.seed, i), 16), 16, 4) for i in range(plan.warmup)]
    await run_point(backend, requests, options, WARMUP_CONCURRENCY)


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1 << 20, i])  # apart from every point's seed


def warn_if_too_long(requests: list[BenchRequest], server: ServerInfo, console: Console) -> None:
    limit = server.max_model_len
    if limit is None:
        return
    over = sum(1 for r in requests if r.prompt_len + r.output_len > limit)
    if over:
        console.print(f"[yellow]warning:[/yellow] {over} requests ask for more than the model's {limit} tokens "
                      "(prompt + output); the server will refuse them")  # fmt: skip


async def _run_with_progress(
    backend: Backend, plan: BenchPlan, index: int, requests: list[BenchRequest], console: Console
) -> list[RequestResult]:
    """run_point with a live bar on a terminal, or a line per tenth done in a log file (a bar
    there would only be drawn at the end)."""
    point = plan.points[index]
    columns = (TextColumn(f"{point.label:>16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[failed]} failed"))  # fmt: skip
    live = plan.progress and console.is_terminal
    with Progress(*columns, console=console, disable=not live) as progress:
        task = progress.add_task(point.label, total=len(requests), failed=0)
        done_count = failed = 0
        started = time.monotonic()

        def done(result: RequestResult) -> None:
            nonlocal done_count, failed
            done_count += 1
            failed += not result.ok
            progress.update(task, advance=1, failed=failed)
            tenth = max(1, len(requests) // 10)
            if plan.progress and not live and (done_count % tenth == 0 or done_count == len(requests)):
                console.print(f"{point.label}: {done_count}/{len(requests)} done, {failed} failed, "
                              f"{time.monotonic() - started:.0f} s")  # fmt: skip

        return await run_point(backend, requests, plan.options, plan.max_in_flight(point), done)


def command_line(argv: list[str]) -> str:
    return shlex.join(["pdmesh", *argv]) if argv else shlex.join(sys.argv)
