"""Engine configuration: frozen dataclasses, one per collaborator.

pdmesh.config builds these from the environment and the command line; the engine never reads
the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequest


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # CPU: the KV pool's size in bytes. CUDA: a fraction of the free GPU memory after weights.
    capacity_bytes: int = 256 * 2**20
    gpu_memory_fraction: float = 0.85
    # Exact block count; overrides both of the above (tests force preemption with tiny pools).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Reservations for KV imports may not take the last blocks: this fraction of the pool stays for
    # running requests to grow into. Without it a burst of reservations can fill the pool while the
    # requests already admitted wait for one more block each — a deadlock.
    reserve_watermark: float = 0.1


@dataclass(frozen=True)
class BatcherConfig:
    max_running: int = 64  # requests in one batch
    max_batched_tokens: int = 2048  # the per-step token budget; long prompts are chunked to fit it
    # Prefill chunk cap for a single request (<= max_batched_tokens); smaller keeps decode latency flat.
    max_prefill_chunk: int = 2048


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"  # a model name known to engine.weights, or a path
    device: str = "cpu"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    cache: CacheConfig = field(default_factory=CacheConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    torch_threads: int | None = None  # CPU threads for torch; None leaves torch's default
    # CPU: steps of at most this many tokens (decode batches, short chunks) run on one thread fewer,
    # leaving a core to the rest of the worker and the mesh (engine.cpu_threads); 0: all threads always.
    # 16: on the 2-core machine one thread won at batch 1 and 8, two at batch 32 (BENCHMARKS.md).
    cpu_small_step_max_tokens: int = 16
    seed: int = 0  # seeds the per-request seeds drawn for requests that bring none
    cuda_graph_max_batch: int = 64  # decode steps up to this batch replay captured CUDA graphs; 0: off
    # Other steps (prefill chunks in the batch) replay captured pieces around eager attention.
    piecewise_cuda_graphs: bool = True
    # Test-only: the step with this number (1-based, counting steps that run a batch: a step that
    # only waits for KV imports touches no device) fails as though the device were lost, so that
    # tests can show a broken worker handing its requests over. 0: never.
    inject_device_loss_at_step: int = 0
    # CPU: linears through oneDNN with weights reordered once at load (engine.cpu_linear); False
    # keeps torch's default BLAS (MKL), which is slow on non-Intel CPUs.
    cpu_packed_linears: bool = True
    # CPU: decode attention through the C kernel built at load (kernels/cpu_native.py), ~3x faster
    # than torch's SDPA over gathered blocks; False (or no C compiler) keeps the SDPA path.
    cpu_native_attention: bool = True
    # CPU: RMSNorm in one C call (kernels/cpu_norm.py) instead of nine torch ops; False keeps the ops.
    cpu_native_norm: bool = True

    def __post_init__(self) -> None:
        if self.cache.block_size < 1:
            raise InvalidRequest("cache.block_size", f"is {self.cache.block_size}", "use a positive size, e.g. 16")
        if self.batcher.max_batched_tokens < 1 or self.batcher.max_running < 1:
            raise InvalidRequest("batcher", "has a non-positive limit", "use positive max_running/max_batched_tokens")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"
