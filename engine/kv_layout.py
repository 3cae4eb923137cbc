"""The shape of the paged KV cache, shared by the engine, the kernels and kvtransfer.

One tensor per layer:

    kv_cache[layer]  # (2, num_blocks, block_size, num_kv_heads, head_dim); [0] is K, [1] is V

so one block's K (or V) for one layer is a contiguous run of block_size * num_kv_heads * head_dim
elements. Two workers may exchange KV only if every field of KVLayout matches (the handshake in
kvtransfer compares them and names the first that differs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LAYOUT_VERSION = 1
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class KVLayout:
    model_fingerprint: str
    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16", "float16"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout_version: int = LAYOUT_VERSION

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token: what a token's KV weighs on the wire."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _DTYPE_BYTES.get(self.dtype, 2)

    @property
    def block_elems_per_layer(self) -> int:
        """Elements of one block in one layer, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim

    def first_difference(self, other: KVLayout) -> str | None:
        """The name of the first field that differs, with both values, or None if compatible."""
        mine, theirs = asdict(self), asdict(other)
        for name, value in mine.items():
            if theirs[name] != value:
                return f"{name} (ours {value!r}, theirs {theirs[name]!r})"
        return None
