"""The Llama family in plain PyTorch: Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM2.

RMSNorm, rotary embeddings (with Llama-3 frequency scaling), grouped-query attention over the
paged cache (engine.attention), SwiGLU, tied or untied embeddings. q/k/v and gate/up are each one
fused matmul; load_weights maps Hugging Face parameter names onto the fused layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import EngineConfig
from engine.cpu_linear import PackedLinear, pack_linears
from engine.model_config import ModelConfig, RopeScaling
from kernels.cpu_norm import NativeRmsNorm
from kernels.layer_ops import KVCache, add_rms_norm, rms_norm, rms_norm_ref, rotary_split, silu_mul, use_fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native: NativeRmsNorm | None = None  # CPU: the same arithmetic in one C call (kernels.cpu_norm)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        native = self.native
        if native is not None and native.supports(x, self.weight):
            got = native(x, self.weight, self.eps)
            return got if out is None else out.copy_(got)
        if self._fused(x):  # CUDA: one Triton kernel (kernels/layer_ops.py)
            return rms_norm(x, self.weight, self.eps, out=out)
        got = rms_norm_ref(x, self.weight, self.eps)  # float32 normalisation, scaled in x's dtype
        return got if out is None else out.copy_(got)

    def add(
        self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(norm(residual + x), residual + x): the residual add and the norm after it, one kernel
        on CUDA. residual_out may be residual: the sum then replaces it in place."""
        if self._fused(x):
            return add_rms_norm(x, residual, self.weight, self.eps, out=out, residual_out=residual_out)
        h = residual + x
        normed = self(h, out)
        return normed, (h if residual_out is None else residual_out.copy_(h))

    def _fused(self, x: torch.Tensor) -> bool:
        return use_fused(x) and x.dim() == 2 and self.weight.dtype == x.dtype


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class Rotary(nn.Module):
    inv_freq: torch.Tensor  # (head_dim/2,) float32

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a signed sin, both (tokens, head_dim), for kernels.layer_ops.rotary_split: the
        sin's first half is negated once here, so that each layer's rotation needs no negation."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (tokens, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (tokens, head_dim)
        sin = emb.sin()
        sin[:, : freqs.shape[1]].neg_()
        return emb.cos().to(dtype), sin.to(dtype)


QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        fused = use_fused(x)  # CUDA: the rotary kernel writes the cache (CPU: attention does, as before)
        q, k, v = self.project(x, cos, sin, cache=(kv_layer, meta.slot_mapping) if fused else None)
        out = paged_attention(q, k, v, kv_layer, meta, self.scale, kv_written=fused)  # (tokens, heads, head_dim)
        return self.o_proj(out.flatten(1))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: QKV | None = None,
        cache: KVCache | None = None,
    ) -> QKV:  # fmt: skip
        """q (tokens, heads, head_dim) and k (tokens, kv_heads, head_dim) with rotary applied, and v
        (into `out`'s buffers when given), k and v also written into `cache`'s slots when given. On
        CUDA one kernel rotates q and k, splits v out and writes the cache."""
        qkv = self.qkv_proj(x)
        return rotary_split(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim, out=out, cache=cache)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))  # one kernel on CUDA


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        kv_layer: torch.Tensor, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the MLP's output, the residual stream before it): the caller adds the two, in the next
        layer's input norm (one kernel on CUDA) or the final one. residual None: x is the stream."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm.add(x, residual)
        attn = self.self_attn(normed, cos, sin, kv_layer, meta)
        normed, residual = self.post_attention_layernorm.add(attn, residual)
        return self.mlp(normed), residual


LayerHook = Callable[[int], None]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.lm_head: nn.Module | None = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (tokens,)
        positions: torch.Tensor,  # (tokens,)
        kv_caches: list[torch.Tensor],  # per layer (2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        on_layer_done: LayerHook | None = None,
    ) -> torch.Tensor:  # (tokens, hidden)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, cos, sin, kv_caches[i], meta)
            if on_layer_done is not None:
                on_layer_done(i)
        assert residual is not None, "a model has at least one layer"
        return self.norm.add(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (rows, hidden) -> (rows, vocab) float32
        head = self.lm_head
        return (F.linear(hidden, self.embed_tokens.weight) if head is None else head(hidden)).float()

    def pack_for_cpu(self) -> None:
        """Every linear, the LM head included, through oneDNN-packed weights (engine.cpu_linear).

        After the weights are loaded, once. A tied LM head gets a packed copy of the embedding
        (the embedding itself stays a plain table for the row lookups)."""
        pack_linears(self)
        if self.lm_head is None:
            self.lm_head = PackedLinear(self.embed_tokens.weight, None)

    def use_native_norms(self, native: NativeRmsNorm | None) -> None:
        """Every RMSNorm through the C kernel (CPU), or back to torch's ops with None."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.native = native

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused layout; every parameter must be set."""
        params = dict(self.named_parameters())
        unset = set(params)
        for name, tensor in tensors:
            target, rows = self._fused_target(name)
            if target not in params:
                continue  # e.g. rotary inv_freq saved by old checkpoints, or lm_head of a tied model
            param = params[target]
            with torch.no_grad():
                (param.data[rows] if rows is not None else param.data).copy_(tensor)
            unset.discard(target)
        if unset:
            raise ValueError(f"checkpoint is missing parameters: {sorted(unset)[:5]}")

    def _fused_target(self, name: str) -> tuple[str, slice | None]:
        cfg = self.config
        q, kv, ffn = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        name = name.removeprefix("model.")
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", slice(0, q)),
            "self_attn.k_proj": ("self_attn.qkv_proj", slice(q, q + kv)),
            "self_attn.v_proj": ("self_attn.qkv_proj", slice(q + kv, q + 2 * kv)),
            "mlp.gate_proj": ("mlp.gate_up_proj", slice(0, ffn)),
            "mlp.up_proj": ("mlp.gate_up_proj", slice(ffn, 2 * ffn)),
        }
        for part, (target, rows) in fused.items():
            if f".{part}." in name:
                return name.replace(part, target), rows
        return name, None

    def init_random(self, seed: int, std: float = 0.02) -> None:
        """Random weights in the model's real shapes, for speed benchmarks (no checkpoint needed)."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=gen)


def build_model(model_config: ModelConfig, config: EngineConfig) -> LlamaModel:
    """Allocate the model on its device without initialising twice (meta first, then empty)."""
    dtype = getattr(torch, config.resolved_dtype)
    with torch.device("meta"):
        model = LlamaModel(model_config).to(dtype)
    model = model.to_empty(device=config.device)
    # to_empty left the rotary buffer uninitialised (and the cast made it low precision): rebuild in fp32.
    model.rotary = Rotary(model_config).to(config.device)
    return model.eval()
