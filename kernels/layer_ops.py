"""A decoder layer's elementwise work on CUDA in one Triton kernel each, and the torch references.

On an H100 a mixed step of 64 decodes and a 256-token prompt chunk spent ~5.7 ms of its ~18.5 ms
of kernels in small elementwise ops: RMSNorm as nine torch ops (with its float32 copies and a
reduction), rotary as a roll plus three strided, non-vectorised ops on the q/k view of the fused
projection, SiLU and a multiply, residual adds, and copies into the piecewise buffers
(BENCHMARKS.md, issue 15). Here each is one kernel that reads its inputs once:

    rms_norm(x, w, eps)                   -> w * norm(x)
    add_rms_norm(x, residual, w, eps)     -> (w * norm(residual + x), residual + x)
    rotary_split(qkv, cos, sin, ...)      -> q, k rotated and v, from the fused projection (and
                                             k, v written into the paged KV cache's slots)
    silu_mul(gate_up)                     -> silu(gate) * up

Each function runs the Triton kernel (kernels/_layer_ops_kernel.py) for CUDA tensors when triton
is installed and its `_ref` twin otherwise; the `_ref` functions are the model's arithmetic in
torch ops (engine/model.py uses them on CPU). Both round where the other rounds: in bf16 they
differ at most where a float32 sum's order or exp's last bit moves a rounding. Outputs may be
given (`out=`), so that a piecewise CUDA graph writes straight into its static buffers.
"""

from __future__ import annotations

import torch

from kernels._triton import check_triton_device, next_power_of_2, require_triton, triton_available

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_fused(x: torch.Tensor) -> bool:
    """True where the Triton kernels run by default: CUDA tensors, triton installed."""
    return x.is_cuda and triton_available()


# -- RMSNorm -------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, as the reference implementation does, then scale in x's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + x
    return rms_norm_ref(h, weight, eps), h


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """weight * x / rms(x) over the last dim; x: (rows, dim), weight: (dim,) in x's dtype."""
    if not _pick(x, use_triton):
        return _into(out, rms_norm_ref(x, weight, eps))
    out = _norm_out(x, out)
    _launch_norm(out, None, x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * h / rms(h), h) with h = residual + x (rounded to x's dtype first, as the model's
    residual add rounds). residual_out may be residual itself: the sum then replaces it in place."""
    if not _pick(x, use_triton):
        normed, h = add_rms_norm_ref(x, residual, weight, eps)
        return _into(out, normed), _into(residual_out, h)
    _check_rows(residual, x, "residual")
    out = _norm_out(x, out)
    residual_out = _norm_out(x, residual_out)
    _launch_norm(out, residual_out, x, residual, weight, eps)
    return out, residual_out


def _launch_norm(
    out: torch.Tensor,
    res_out: torch.Tensor | None,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> None:
    _check_rows(x, x, "x")
    rows, dim = x.shape
    if weight.shape != (dim,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(
            f"weight must be ({dim},) contiguous in x's dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    check_triton_device(*(t for t in (out, res_out, x, residual, weight) if t is not None))
    if rows == 0:
        return
    require_triton()
    from kernels._layer_ops_kernel import _rms_norm_kernel

    block = next_power_of_2(dim)
    res = residual if residual is not None else x
    r_out = res_out if res_out is not None else out
    _rms_norm_kernel[(rows,)](
        out, r_out, x, res, weight, eps, dim,
        out.stride(0), r_out.stride(0), x.stride(0), res.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip


def _norm_out(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_rows(out, x, "out")
    return out


# -- rotary and the q/k/v split ------------------------------------------------------------------

KVCache = tuple[torch.Tensor, torch.Tensor]  # (kv_layer, slots): a layer's cache and each token's slot


def write_kv_ref(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_layer: (2, num_blocks, block_size, kv_heads, head_dim) (engine/kv_layout.py); k, v:
    (tokens, kv_heads, head_dim); slots: (tokens,) int64, block_id * block_size + offset. A negative
    slot (a padding row) is not written."""
    flat = kv_layer.view(2, -1, kv_layer.shape[-2], kv_layer.shape[-1])  # (2, num_slots, kv_heads, head_dim)
    if slots.numel() and slots.device.type == "cpu" and int(slots.min()) < 0:  # a check that would sync a GPU
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def rotary_split_ref(
    qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (tokens, heads, head_dim) and k (tokens, kv_heads, head_dim) rotated, and v, from qkv
    (tokens, (heads + 2 * kv_heads) * head_dim). The rotate-half convention, x * cos + cat(-x2, x1)
    * sin, computed as x * cos + cat(x2, x1) * cat(-sin1, sin2): the same products (a sign moves
    between factors exactly), fewer ops; q and k side by side in each row rotate as one."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk = qkv[:, : q_size + kv_size].view(-1, num_heads + num_kv_heads, head_dim)
    rotated = qk.roll(head_dim // 2, dims=-1)
    qk = qk * cos[:, None, :] + rotated * signed_sin[:, None, :]
    v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
    return qk[:, :num_heads], qk[:, num_heads:], v


def rotary_split(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cache: KVCache | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rotary_split_ref's q, k, v in one kernel; out: (q, k, v) buffers to write into, each
    (tokens, heads, head_dim) with its last dim contiguous; cache: (kv_layer, slots) to write k and
    v into as well, as write_kv_ref does (the same kernel: no index_copy_ per layer on CUDA)."""
    if not _pick(qkv, use_triton):
        got = rotary_split_ref(qkv, cos, signed_sin, num_heads, num_kv_heads, head_dim)
        if out is not None:
            for dst, src in zip(out, got, strict=True):
                dst.copy_(src)
            got = out
        if cache is not None:
            write_kv_ref(cache[0], got[1], got[2], cache[1])
        return got
    tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be (tokens, {width}) contiguous in its last dim, got {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary, got {head_dim}")
    for name, t in (("cos", cos), ("signed_sin", signed_sin)):
        if t.shape != (tokens, head_dim) or t.stride(1) != 1 or t.dtype != qkv.dtype:
            raise ValueError(f"{name} must be ({tokens}, {head_dim}) in qkv's dtype, got {tuple(t.shape)} {t.dtype}")
    if out is None:
        out = tuple(qkv.new_empty(tokens, h, head_dim) for h in (num_heads, num_kv_heads, num_kv_heads))  # type: ignore[assignment]
    assert out is not None
    q, k, v = out
    for name, t, h in (("q", q, num_heads), ("k", k, num_kv_heads), ("v", v, num_kv_heads)):
        if t.shape != (tokens, h, head_dim) or t.stride(2) != 1 or t.dtype != qkv.dtype:
            raise ValueError(f"{name} out must be ({tokens}, {h}, {head_dim}) in qkv's dtype, got {tuple(t.shape)}")
    flat = _cache_slots(cache, qkv, tokens, num_kv_heads, head_dim)
    check_triton_device(qkv, cos, signed_sin, q, k, v, *([flat[0], flat[2]] if flat is not None else []))
    if tokens:
        _launch_rotary(q, k, v, qkv, cos, signed_sin, flat, num_heads, num_kv_heads, head_dim)
    return q, k, v


def _cache_slots(
    cache: KVCache | None, qkv: torch.Tensor, tokens: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(K slots, V slots, slots): the cache as (num_slots, kv_heads, head_dim) views, checked."""
    if cache is None:
        return None
    kv_layer, slots = cache
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2 or kv_layer.shape[-2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"the cache must be (2, blocks, block_size, {num_kv_heads}, {head_dim}), got {tuple(kv_layer.shape)}"
        )
    if kv_layer.dtype != qkv.dtype or slots.dtype != torch.int64 or slots.shape != (tokens,):
        raise ValueError(
            f"the cache must be in qkv's dtype and slots ({tokens},) int64, got {kv_layer.dtype}, {slots.dtype}"
        )
    flat = kv_layer.view(2, -1, num_kv_heads, head_dim)  # raises unless each layer's slots are evenly strided
    if flat.stride(2) != head_dim or flat.stride(3) != 1:
        raise ValueError(f"the cache's heads must be contiguous, got strides {tuple(kv_layer.stride())}")
    return flat[0], flat[1], slots.contiguous()


def _launch_rotary(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, num_heads: int, num_kv_heads: int, head_dim: int,
) -> None:  # fmt: skip
    require_triton()
    from kernels._layer_ops_kernel import _rotary_split_kernel

    block_h = 8
    total = num_heads + 2 * num_kv_heads
    k_cache, v_cache, slots = flat if flat is not None else (k, v, qkv)  # unread without a cache
    _rotary_split_kernel[(qkv.shape[0], -(-total // block_h))](
        q, k, v, qkv, cos, sin, k_cache, v_cache, slots, k_cache.stride(0), k_cache.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        qkv.stride(0), cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim), BLOCK_H=block_h, WRITE_CACHE=flat is not None, num_warps=4,
    )  # fmt: skip


# -- SwiGLU's activation -------------------------------------------------------------------------


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """silu(gate) * up, gate_up: (rows, 2 * width) with the gate first (the fused projection)."""
    if not _pick(gate_up, use_triton):
        return _into(out, silu_mul_ref(gate_up))
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be (rows, 2 * width) contiguous in its last dim, got {tuple(gate_up.shape)}")
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = gate_up.new_empty(rows, width)
    elif out.shape != (rows, width) or out.stride(1) != 1 or out.dtype != gate_up.dtype:
        raise ValueError(f"out must be ({rows}, {width}) in gate_up's dtype, got {tuple(out.shape)} {out.dtype}")
    check_triton_device(gate_up, out)
    if rows:
        require_triton()
        from kernels._layer_ops_kernel import _silu_mul_kernel

        block = min(1024, next_power_of_2(width))
        _silu_mul_kernel[(rows, -(-width // block))](
            out, gate_up, width, out.stride(0), gate_up.stride(0), BLOCK=block, num_warps=4
        )
    return out


# -- shared checks -------------------------------------------------------------------------------


def _pick(x: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return use_fused(x) and x.dtype in _DTYPES
    if use_triton and x.dtype not in _DTYPES:
        raise ValueError(f"the Triton path takes {_DTYPES}, got {x.dtype}")
    return use_triton


def _check_rows(t: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or t.shape != like.shape or t.dtype != like.dtype or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be {tuple(like.shape)} {like.dtype}, contiguous in its last dim; "
            f"got {tuple(t.shape)} {t.dtype}"
        )


def _into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out
