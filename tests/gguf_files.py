"""Small GGUF files written by the tests: malformed ones, and a tiny random llama model
that loads and generates in milliseconds (for tests of the loading path, not of quality)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from rkllmd.backends.cpu.gguf import GGML_F32
from rkllmd.backends.cpu.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, bytes_to_unicode


def write_gguf(path: Path, metadata: dict, tensors=()) -> Path:
    """A GGUF v3 file with (name, ggml type, dims innermost first, data) tensors."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v) -> bytes:
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v)
        if isinstance(v, np.ndarray):
            return struct.pack("<IIQ", 9, 5, len(v)) + v.astype("<i4").tobytes()
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(map(string, v))

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, v in metadata.items():
        out += string(key) + value(v)
    offset, blobs = 0, []
    for name, ggml_type, dims, data in tensors:
        out += string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
        blobs.append(data + bytes(-len(data) % 32))
        offset += len(blobs[-1])
    out += bytes(-len(out) % 32)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


def tiny_llama(path: Path, seed: int = 0, layers: int = 2, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A llama GGUF with random float32 weights and a byte-level vocabulary (256 bytes,
    a few merges, ChatML's control tokens), in the layout llama.cpp writes."""
    rng = np.random.default_rng(seed)
    head_dim, ffn = dim // heads, 2 * dim
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    types = [TOKEN_NORMAL] * (len(tokens) - 3) + [TOKEN_CONTROL] * 3
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.alignment": 32,
        "llama.block_count": layers,
        "llama.embedding_length": dim,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.feed_forward_length": ffn,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.context_length": 256,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": len(tokens) - 2,
    }

    def f32(*shape: int) -> bytes:  # numpy shape (outer first)
        return (rng.standard_normal(shape) * 0.3).astype("<f4").tobytes()

    def tensor(name: str, *shape: int) -> tuple:
        return (name, GGML_F32, tuple(reversed(shape)), f32(*shape))

    tensors = [tensor("token_embd.weight", len(tokens), dim), tensor("output_norm.weight", dim)]
    for i in range(layers):
        tensors += [
            tensor(f"blk.{i}.attn_norm.weight", dim),
            tensor(f"blk.{i}.attn_q.weight", heads * head_dim, dim),
            tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, dim),
            tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, dim),
            tensor(f"blk.{i}.attn_output.weight", dim, heads * head_dim),
            tensor(f"blk.{i}.ffn_norm.weight", dim),
            tensor(f"blk.{i}.ffn_gate.weight", ffn, dim),
            tensor(f"blk.{i}.ffn_up.weight", ffn, dim),
            tensor(f"blk.{i}.ffn_down.weight", dim, ffn),
        ]
    return write_gguf(path, metadata, tensors)


def tokenizer_json(metadata: dict) -> str:
    """A Hugging Face ``tokenizer.json`` for a GGUF's byte-level BPE vocabulary (its tokens,
    merges and control tokens, SmolLM2's pre-tokenizer: digits apart, then GPT-2's
    byte-level split): what a ``.rkllm`` model converted from that model comes with."""
    import json

    tokens, kinds = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (text, kind) in enumerate(zip(tokens, kinds)) if kind == TOKEN_CONTROL
    ]
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {text: i for i, text in enumerate(tokens)}, "merges": list(metadata["tokenizer.ggml.merges"])},
    })
