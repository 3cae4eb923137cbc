"""Engine speed against its floors and against transformers, measured in one run.

GPU (random bf16 weights in Llama-3.1-8B shapes; no checkpoint travels):
    python bench/engine.py --device cuda --out engine.json
CPU (the embedded SmolLM2-135M-Instruct):
    python bench/engine.py --device cpu --out engine.json

Prints, for decode at each batch size, ms/step and tokens/s beside the roofline floor (bytes the
step must read over a device-copy bandwidth measured in this run) and beside transformers'
generate() on the same shapes; for prefill, the time of one long prompt beside its FLOP floor (over
a matmul rate measured in this run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import BatcherConfig, CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.model_config import ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

LLAMA_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, tie_word_embeddings=False,
)  # fmt: skip


CLOCK = [time.perf_counter]  # --clock thread swaps in time.thread_time


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written: the rate at which
    memory moves bytes in either direction, so a read-only step of B bytes takes at least B / rate."""
    n = (1 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    t = CLOCK[0]()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (CLOCK[0]() - t)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    t = CLOCK[0]()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (CLOCK[0]() - t)


@dataclass
class DecodeResult:
    batch: int
    ms_per_step: float
    tokens_per_s: float
    floor_ms: float
    hf_ms_per_step: float | None = None


def weight_bytes(m: ModelConfig, elem: int) -> int:
    """Bytes a decode step reads from weights: every layer, the final norm and the LM head
    (the embedding table is read one row per token, so it is left out unless tied)."""
    layer = (
        m.hidden_size * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        + m.num_heads * m.head_dim * m.hidden_size
        + 3 * m.hidden_size * m.intermediate_size
        + 2 * m.hidden_size
    )
    return elem * (m.num_layers * layer + m.hidden_size + m.vocab_size * m.hidden_size)


def time_decode(engine: Engine, batch: int, prompt_len: int, steps: int, device: str) -> float:
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", [(7 * i + j) % 1000 + 1 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()  # prefill everything first
    for _ in range(3):
        engine.step()  # warm up (captures the CUDA graph for this batch)
    sync(device)
    t = CLOCK[0]()
    for _ in range(steps):
        engine.step()
    sync(device)
    elapsed = CLOCK[0]() - t
    for rid in list(engine.requests):
        engine.abort(rid)
    return elapsed / steps


def time_mixed(
    engine: Engine, batch: int, prompt_len: int, chunk: int, device: str, seed: int, reps: int = 8
) -> float:
    """Median seconds of a step that decodes `batch` requests while one new `chunk`-token prompt
    prefills in the same step (what a serving worker's steps look like under mixed load). Give
    each call its own seed: a prompt seen before would be served from the prefix cache."""
    params = SamplingParams(max_tokens=reps * 4 + 16, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"m{batch}-{i}", [(5 * i + j) % 1000 + 1 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    gen = torch.Generator().manual_seed(seed)
    times = []
    for rep in range(reps + 1):  # the first is a warm-up
        prompt = torch.randint(1, 30_000, (chunk,), generator=gen).tolist()  # distinct: no prefix hits
        engine.add_request(f"chunk{chunk}-{rep}", prompt, SamplingParams(max_tokens=1))
        sync(device)
        t = CLOCK[0]()
        engine.step()
        sync(device)
        times.append(CLOCK[0]() - t)
    for rid in list(engine.requests):
        engine.abort(rid)
    return sorted(times[1:])[reps // 2]


def time_prefill(engine: Engine, prompt_len: int, device: str) -> float:
    best = float("inf")
    for rep in range(3):
        prompt = [(3 * j + rep) % 1000 + 1 for j in range(prompt_len)]
        engine.add_request(f"p{rep}", prompt, SamplingParams(max_tokens=1))
        sync(device)
        t = CLOCK[0]()
        while engine.has_work():
            engine.step()
        sync(device)
        best = min(best, CLOCK[0]() - t)
    return best


def hf_decode_ms(model: torch.nn.Module, batch: int, prompt_len: int, steps: int, device: str) -> float:
    """transformers' generate(): (time for 1 + steps tokens - time for 1 token) / steps."""
    ids = torch.randint(1, 1000, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        sync(device)
        t = CLOCK[0]()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return CLOCK[0]() - t

    run(2)
    return (run(steps + 1) - run(1)) / steps * 1000


def build_engines(args: argparse.Namespace) -> tuple[Engine, ModelConfig, torch.nn.Module | None]:
    cuda = args.device.startswith("cuda")
    if cuda:
        config = EngineConfig(
            device=args.device, cache=CacheConfig(gpu_memory_fraction=0.35),
            # max_running above the largest decode batch, so a mixed step can add a prompt to it.
            batcher=BatcherConfig(max_running=128, max_batched_tokens=4096, max_prefill_chunk=4096),
        )
        engine = Engine.with_random_weights(LLAMA_8B, config)
        return engine, LLAMA_8B, (hf_random_llama(LLAMA_8B, args.device) if args.transformers else None)
    config = EngineConfig(
        model="smollm2", dtype=args.dtype, cache=CacheConfig(capacity_bytes=512 << 20), torch_threads=args.threads,
        cpu_packed_linears=not args.torch_linears,
    )  # fmt: skip
    engine = Engine.from_config(config)
    return engine, engine.model_config, (hf_smollm2(engine.dtype) if args.transformers else None)


def hf_random_llama(m: ModelConfig, device: str) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta, eos_token_id=None,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        model.model.rotary_emb.__init__(cfg, device=device)  # to_empty left its buffers garbage
    return model.eval()


def hf_smollm2(dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    from engine.weights.default_model import resolve_model_path

    path = Path(resolve_model_path("smollm2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--prefill-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mixed-chunks", default="", help="prompt chunk sizes to time joining the largest batch")
    parser.add_argument("--dtype", default=None, help="CPU: float32 (default) or bfloat16; transformers runs the same")
    parser.add_argument("--torch-linears", action="store_true", help="CPU: torch's own BLAS, not oneDNN-packed weights")
    parser.add_argument(
        "--clock", choices=["wall", "thread"], default="wall",
        help="thread: this thread's CPU time, which a busy shared machine disturbs far less (only with --threads 1)",
    )  # fmt: skip
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batches or ("1,16,64" if cuda else "1,16")).split(",")]
    prompt_len = args.prompt_len or (512 if cuda else 64)
    prefill_len = args.prefill_len or (2048 if cuda else 512)
    steps = args.steps or (50 if cuda else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.threads != 1 or cuda:
            parser.error("--clock thread measures one CPU thread: use it with --threads 1 on CPU")
        CLOCK[0] = time.thread_time

    engine, m, hf = build_engines(args)
    dtype = engine.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    bw, flops = copy_bandwidth(args.device), matmul_rate(args.device, dtype)
    # A decode step reads the weights once and each sequence's KV (mean context ~ prompt + steps/2).
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * elem
    results = []
    for b in batches:
        step_s = time_decode(engine, b, prompt_len, steps, args.device)
        floor_s = (weight_bytes(m, elem) + b * (prompt_len + steps / 2) * kv_per_token) / bw
        r = DecodeResult(b, step_s * 1000, b / step_s, floor_s * 1000)
        if hf is not None:
            r.hf_ms_per_step = hf_decode_ms(hf, b, prompt_len, max(8, steps // 2), args.device)
        results.append(r)
        print(f"decode batch {b}: {r.ms_per_step:.2f} ms/step ({r.tokens_per_s:.1f} tok/s), floor {r.floor_ms:.2f} ms"
              + (f", transformers {r.hf_ms_per_step:.2f} ms/step" if r.hf_ms_per_step else ""), flush=True)
    mixed = []
    pieces = engine.runner.pieces
    for chunk in [int(c) for c in args.mixed_chunks.split(",") if c]:
        b = batches[-1]
        ms = time_mixed(engine, b, prompt_len, chunk, args.device, seed=2 * chunk) * 1000
        row = {"batch": b, "chunk": chunk, "ms_per_step": ms}
        if pieces is not None:  # the same step launched op by op, for comparison (fresh prompts)
            engine.runner.pieces = None
            row["op_by_op_ms_per_step"] = time_mixed(engine, b, prompt_len, chunk, args.device, 2 * chunk + 1) * 1000
            engine.runner.pieces = pieces
        mixed.append(row)
        print(f"mixed step: batch {b} decoding + a {chunk}-token prompt chunk: {row['ms_per_step']:.2f} ms"
              + (f" (op by op {row['op_by_op_ms_per_step']:.2f} ms)" if pieces is not None else ""), flush=True)
    prefill_s = time_prefill(engine, prefill_len, args.device)
    params = weight_bytes(m, elem) // elem
    attn = 2 * m.num_layers * m.num_heads * m.head_dim * prefill_len * prefill_len  # causal QK^T and PV
    prefill_flops = 2 * params * prefill_len + attn
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "linears": "torch" if args.torch_linears else "oneDNN-packed",
        "date": time.strftime("%Y-%m-%d"),
        "model": "llama-3.1-8b-shape random bf16" if cuda else "SmolLM2-135M-Instruct (GGUF, float32)",
        "copy_bandwidth_GBps": bw / 1e9,
        "matmul_TFLOPs": flops / 1e12,
        "decode": [r.__dict__ for r in results],
        "mixed": mixed,
        "graph_capture": [c.__dict__ for c in engine.graph_capture],
        "prefill": {"tokens": prefill_len, "ms": prefill_s * 1000, "floor_ms": prefill_flops / flops * 1000,
                    "achieved_TFLOPs": prefill_flops / prefill_s / 1e12},
    }  # fmt: skip
    print(f"\ncopy {bw / 1e9:.0f} GB/s (read+write), matmul {flops / 1e12:.1f} TFLOP/s, {summary['device']}")
    print(f"{'batch':>5} {'ms/step':>9} {'floor ms':>9} {'x floor':>8} {'tok/s':>9} {'HF ms/step':>11} {'HF/ours':>8}")
    for r in results:
        hf_s = f"{r.hf_ms_per_step:11.2f} {r.hf_ms_per_step / r.ms_per_step:8.2f}" if r.hf_ms_per_step else ""
        print(f"{r.batch:5d} {r.ms_per_step:9.2f} {r.floor_ms:9.2f} {r.ms_per_step / r.floor_ms:8.2f} "
              f"{r.tokens_per_s:9.1f} {hf_s}")  # fmt: skip
    p = summary["prefill"]
    print(f"prefill {prefill_len} tokens: {p['ms']:.1f} ms, floor {p['floor_ms']:.1f} ms, "
          f"{p['achieved_TFLOPs']:.1f} TFLOP/s = {p['achieved_TFLOPs'] * 1e12 / flops:.0%} of matmul rate")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
