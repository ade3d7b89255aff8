"""A llama model's dimensions, as its GGUF metadata gives them.

Its own module because both the numpy model (``model``) and the C forward pass that runs
on its weights (``kernels``) size everything by it, and ``model`` uses ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    train_context_length: int

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> ModelConfig:
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"model architecture is {arch!r}; only 'llama' is supported")
        dim = int(metadata["llama.embedding_length"])
        n_heads = int(metadata["llama.attention.head_count"])
        n_kv_heads = int(metadata.get("llama.attention.head_count_kv", n_heads))
        # Both forward passes (and forward.c's indexing) rely on these.
        if not (0 < n_kv_heads <= n_heads and n_heads % n_kv_heads == 0 and dim % n_heads == 0
                and (dim // n_heads) % 2 == 0):
            raise ValueError(f"{n_heads} heads, {n_kv_heads} KV heads and embedding length {dim} do not divide evenly "
                             "into heads of an even dimension")
        head_dim = dim // n_heads
        rope_dims = int(metadata.get("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(f"rotary dimension {rope_dims} != head dimension {head_dim} is not supported")
        return cls(
            n_layers=int(metadata["llama.block_count"]),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(metadata["llama.feed_forward_length"]),
            vocab_size=len(metadata["tokenizer.ggml.tokens"]),
            rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(metadata["llama.attention.layer_norm_rms_epsilon"]),
            train_context_length=int(metadata.get("llama.context_length", 0)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * 4
