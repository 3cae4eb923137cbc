"""The KV cache tensors: one (2, num_blocks, block_size, kv_heads, head_dim) tensor per layer.

Sizing: on CPU a byte budget; on CUDA a fraction of the memory still free after the weights.
Owns the bytes; which block belongs to whom is engine.block_pool's business.
"""

from __future__ import annotations

import torch

from engine.config import CacheConfig
from engine.errors import OutOfBlocks
from engine.model_config import ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim * elem


def plan_num_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * cache.gpu_memory_fraction)
    else:
        budget = cache.capacity_bytes
    n = budget // per_block
    if n < 2:
        raise OutOfBlocks(
            f"the KV budget of {budget} bytes holds {n} blocks of {per_block} bytes; raise the cache capacity"
        )
    return n


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
