"""Where a decode step's time goes: matrix products, attention, sampling, the rest.

After a prompt of --prompt-tokens, times in one run:
- the whole step (``Model.decode``), median over --steps steps;
- its matrix-vector products alone (the same products on the same buffers: q/k/v,
  output, gate/up, down for every layer, then the tied head), and the bandwidth they
  reach streaming the float32 weights, which bounds decode from above;
- its attention alone (scores, softmax, weighted values, for every layer, at this context);
- sampling: greedy (an argmax) and top-k 40 / top-p 0.95 / temperature 0.8;
- the rest: norms, rotary, activations and Python's own overhead, by difference.
Run: python bench/decode_profile.py [--prompt-tokens 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, words  # noqa: E402

from rkllmd.backends.base import SamplingParams  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402
from rkllmd.backends.cpu.model import Model  # noqa: E402
from rkllmd.sampling import Sampler  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def matrix_products(model: Model) -> None:
    """One step's matrix-vector products, on the model's own decode buffers."""
    for layer_products in model._layer_products:
        for product in layer_products:
            product()
    model._head_product()


def attention(model: Model, n_keys: int) -> None:
    """One step's attention over ``n_keys`` positions, for every layer."""
    cfg = model.config
    queries = model._rot[: cfg.n_heads].reshape(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)
    scores = model._scores[:, :, :n_keys]
    for layer in range(cfg.n_layers):
        np.matmul(queries, model.keys[layer][:, :, :n_keys], out=scores)
        totals = model._exp_scores(scores, model._row)
        np.matmul(scores, model.values[layer][:, :n_keys], out=model._attn)
        model._attn /= totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    model = backend.model
    text = backend.render([{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}])
    ids = backend.tokenizer.encode(text)
    logits = model.prefill(ids, 0)
    token, pos, step_times = int(np.argmax(logits)), len(ids), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logits = model.decode(token, pos)
        step_times.append((time.perf_counter() - t0) * 1000)
        token, pos = int(np.argmax(logits)), pos + 1
    step = statistics.median(step_times)
    n_keys = pos

    products = median_ms(lambda: matrix_products(model), args.steps)
    attend = median_ms(lambda: attention(model, n_keys), args.steps)
    greedy = Sampler(SamplingParams(temperature=0))
    sampled = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1))
    sample_greedy = median_ms(lambda: greedy.sample(logits, ids), args.steps)
    sample_topk = median_ms(lambda: sampled.sample(logits, ids), args.steps)

    weight_bytes = sum(a.nbytes for name, a in model.w.arrays().items() if name not in ("attn_norm", "ffn_norm", "output_norm"))
    rest = step - products - attend
    print(f"decode step at context {n_keys}, median of {args.steps}: {step:.2f} ms ({1000 / step:.1f} tokens/s)\n")
    print("| part | ms per step | share |")
    print("|---|---:|---:|")
    for label, ms in (("matrix-vector products (30 layers + head)", products), ("attention", attend),
                      ("norms, rotary, activations, Python (by difference)", rest)):
        print(f"| {label} | {ms:.2f} | {ms / step * 100:.0f} % |")
    print(f"| sampling, greedy (argmax; not part of the step) | {sample_greedy:.3f} | {sample_greedy / step * 100:.1f} % |")
    print(f"| sampling, top-k 40 / top-p 0.95 / T 0.8 (not part of the step) | {sample_topk:.3f} | {sample_topk / step * 100:.1f} % |")
    print(f"\nweights streamed per step: {weight_bytes / 1e6:.0f} MB; the products alone reach "
          f"{weight_bytes / products / 1e6:.1f} GB/s, a limit of {1000 / products:.1f} tokens/s; "
          f"the step is at {products / step * 100:.0f} % of it")


if __name__ == "__main__":
    main()
