"""Inputs shared by the kernel tests: paged-attention batches and KV pools with scattered blocks.

Every slot that a kernel must not read (unused blocks, slots past a context) holds NaN, so a
kernel that reads one shows it in its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).parent


@dataclass(frozen=True)
class DecodeCase:
    q: torch.Tensor  # (batch, num_heads, head_dim)
    k_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables: torch.Tensor  # (batch, max_blocks_per_seq) int32, padded with 0
    context_lens: torch.Tensor  # (batch,) int32
    scale: float

    @property
    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.scale


def decode_case(
    context_lens: list[int],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    extra_blocks: int = 3,
    seed: int = 0,
) -> DecodeCase:
    """A batch whose sequences own disjoint, shuffled blocks of one cache; block 0 is never owned."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = 1 + sum(blocks_per_seq) + extra_blocks
    owned = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(context_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    for seq, (length, nblocks) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        ids = [owned.pop() for _ in range(nblocks)]
        table[seq, :nblocks] = torch.tensor(ids, dtype=torch.int32)
        tokens = torch.arange(length)
        blocks, slots = torch.tensor(ids)[tokens // block_size], tokens % block_size
        k_cache[blocks, slots] = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        v_cache[blocks, slots] = torch.randn(length, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen)
    return DecodeCase(
        q=q.to(device, dtype),
        k_cache=k_cache.to(device, dtype),
        v_cache=v_cache.to(device, dtype),
        block_tables=table.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


def dense_attention_f64(case: DecodeCase) -> torch.Tensor:
    """Textbook softmax attention in float64 over each sequence's tokens, read token by token."""
    _, block_size, num_kv_heads, _ = case.k_cache.shape
    group = case.q.shape[1] // num_kv_heads
    outs = []
    for seq, length in enumerate(case.context_lens.tolist()):
        rows = [(int(case.block_tables[seq, t // block_size]), t % block_size) for t in range(length)]
        k = torch.stack([case.k_cache[b, s] for b, s in rows]).double()  # (length, kv_heads, head_dim)
        v = torch.stack([case.v_cache[b, s] for b, s in rows]).double()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # per query head
        logits = torch.einsum("hd,thd->ht", case.q[seq].double(), k) * case.scale
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(logits, dim=-1), v))
    return torch.stack(outs)


def kv_pool(
    num_layers: int, num_blocks: int, *, block_size: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
) -> list[torch.Tensor]:  # fmt: skip
    """num_layers random KV tensors, each (2, num_blocks, block_size, num_kv_heads, head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(num_layers)]


def nan_staging(layers: list[torch.Tensor], n: int) -> torch.Tensor:
    """A NaN-filled staging buffer for n blocks of these layers: (num_layers, 2, n, *block)."""
    _, _, *block_shape = layers[0].shape
    return torch.full((len(layers), 2, n, *block_shape), float("nan"), dtype=layers[0].dtype, device=layers[0].device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison compares equal to itself)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def run_in_interpreter(test_file: str) -> None:
    """Run a test module under TRITON_INTERPRET=1 in a fresh interpreter; fail with its output.

    Triton reads the switch when a kernel is defined, so it cannot be flipped inside this process.
    """
    env = {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / test_file)]
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{test_file} under the Triton interpreter:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    )
