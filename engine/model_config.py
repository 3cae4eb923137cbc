"""The architecture of a Llama-family model, as the engine needs it.

Built from a Hugging Face config.json or from GGUF metadata (engine/weights/); the model
(engine/model.py) and the KV cache size themselves from it and from nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.x "llama3" frequency scaling. Other rope types are refused at load."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Per element size is the cache dtype's; this counts elements (K and V, all layers)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def fingerprint(self, weights_digest: str = "") -> str:
        """A short stable id for "same model": architecture plus a digest of the weights.

        Prefix-cache hashes are namespaced by it and the KV hand-off refuses peers whose
        fingerprint differs, so two different checkpoints never share KV.
        """
        blob = json.dumps(asdict(self), sort_keys=True) + weights_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
