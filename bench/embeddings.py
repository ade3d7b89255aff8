"""Embedding throughput: ours against our own prefill and llama.cpp's embedding mode,
side by side in one run.

Same model (SmolLM2-135M-Instruct, float32 weights on both sides: llama.cpp's F32 copy of
the bundled Q4_1 file, made by tools/make_llama_references.py's float32_copy), same texts,
same two threads, three engines taking turns run by run (a disturbance of the shared
machine hits all alike):
- ours, embed: ``CpuBackend.embed`` as the daemon's ``embed`` runs it (the list packed into
  passes of ``prefill_chunk`` rows, up to 8 texts at a time, each in a scratch KV cache;
  mean pooling in numpy);
- ours, prefill: the same texts prefilled one by one as a generation's prompt is (chunks of
  ``prefill_chunk``, logits of the last token): the rate the issue asks embeddings to match;
- llama.cpp, embed: ``Llama(embedding=True, pooling_type=MEAN).embed(texts)`` (its own
  batching of sequences into ``n_batch`` tokens).
Two workloads: document chunks (a RAG index's: --chunks of about --chunk-tokens each) and
short texts (queries, titles: --short of about 12 tokens). Prints tokens/s, min / median /
max of --runs runs, and whether the embeddings agree (cosine with llama.cpp's).

Needs llama-cpp-python (a wheel built from source, see docs/benchmarks.md).
Run: python bench/embeddings.py [--runs 5] [--chunks 32] [--chunk-tokens 200] [--short 64]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from daemon import KERNELS_DIR, WEIGHTS_DIR  # noqa: E402
from make_llama_references import PASSAGE, float32_copy  # noqa: E402

import numpy as np  # noqa: E402

from rkllmd.backends.cpu.backend import CpuBackend, bundled_model_path  # noqa: E402

THREADS = 2
_QUIET = None


def chunk_texts(count: int, tokens: int, tokenize: Callable[[str], list[int]]) -> list[str]:
    """``count`` different passages of about ``tokens`` tokens each."""
    words = (PASSAGE * 8).split()
    texts = []
    for i in range(count):
        start = (i * 37) % 200
        text = f"Chunk {i}: " + " ".join(words[start : start + tokens])
        while len(tokenize(text)) > tokens:
            text = text.rsplit(" ", 1)[0]
        texts.append(text)
    return texts


def short_texts(count: int) -> list[str]:
    subjects = ("the bridge", "the canal", "the railway", "the market", "the bakery", "the inns", "the ford", "the towpath")
    return [f"When was {subjects[i % len(subjects)]} of Ebberley built, question {i}?" for i in range(count)]


def ours_embed(backend: CpuBackend, ids: list[list[int]]) -> list[np.ndarray]:
    return [vector for vector, _ in backend.embed(ids, lambda: None)]


def ours_prefill(backend: CpuBackend, ids: list[list[int]]) -> None:
    model = backend.model
    slot = model.new_slot()
    for text_ids in ids:
        model.prefill(slot, text_ids, 0)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rkllmd-bench")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (see docs/benchmarks.md)", file=sys.stderr)
        return 1
    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR, context_length=1024)
    backend.load()
    f32 = float32_copy(llama_cpp, bundled_model_path(), args.workdir)
    llm = llama_cpp.Llama(str(f32), n_ctx=1024, n_batch=1024, n_ubatch=1024, n_threads=THREADS, n_threads_batch=THREADS,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, embedding=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    workloads = {
        f"{args.chunks} document chunks of ~{args.chunk_tokens} tokens": chunk_texts(args.chunks, args.chunk_tokens, backend.tokenize),
        f"{args.short} short texts": short_texts(args.short),
    }
    print(f"CPU: {os.cpu_count()} cores; ours: {backend.describe()['decode']}; "
          f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, {llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"float32 weights both sides, {THREADS} threads, {args.runs} runs each, engines taking turns; tokens/s min / median / max\n")
    print("| workload | tokens | ours: embed | ours: prefill (as a prompt) | llama.cpp: embed (mean pooling) | ours ÷ llama.cpp (median) | cosine ours vs llama.cpp (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, texts in workloads.items():
        ids = [backend.tokenize(text) for text in texts]
        tokens = sum(map(len, ids))
        engines: dict[str, Callable[[], object]] = {
            "embed": lambda: ours_embed(backend, ids),
            "prefill": lambda: ours_prefill(backend, ids),
            "llama": lambda: llm.embed(texts, normalize=False),
        }
        rates: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, object] = {}
        for name, run in engines.items():
            outputs[name] = run()  # warm-up: page the weights in, let the other engine's threads go idle
        for _ in range(args.runs):
            for name, run in engines.items():
                started = time.perf_counter()
                run()
                rates[name].append(tokens / (time.perf_counter() - started))
        agreement = min(cosine(a, b) for a, b in zip(outputs["embed"], outputs["llama"]))

        def cell(name: str) -> str:
            values = rates[name]
            return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"

        ratio = statistics.median(rates["embed"]) / statistics.median(rates["llama"])
        print(f"| {label} | {tokens} | {cell('embed')} | {cell('prefill')} | {cell('llama')} | {ratio:.2f} | {agreement:.5f} |")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
