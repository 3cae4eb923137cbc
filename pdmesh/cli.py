"""The `pdmesh` command line: one subcommand per job, each a thin call into its module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from pdmesh.demo import run_demo

    run_demo(args.model, args.device, args.prompt, args.max_tokens, args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description="LLM serving with prefill and decode disaggregated")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the engine in this process and stream one chat answer")
    demo.add_argument("prompt", nargs="?", default="What is the capital of France?")
    demo.add_argument("--model", default="smollm2", help="smollm2, a Hugging Face directory or a GGUF file")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
