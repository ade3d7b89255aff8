"""Where a decode step's time goes, for the C step and the numpy reference step, against
this machine's memory-bandwidth limit; and prefill, C against numpy.

Prints the CPU's vector features, then, after a prompt of --prompt-tokens, in one run,
on the same mapped weights:
- the limit: a plain read of the weights' bytes with all cores (median of --rounds), and
  each decode step's share of it (a step streams every weight once);
- prefill of the prompt, the C forward pass against numpy's, alternating;
- the whole step (``Model.decode``) with the C step (forward.c) and with the numpy
  reference (``model.kernels = "numpy"``), median over --steps steps, alternating rounds
  so a disturbance hits both;
- the numpy step's parts: its matrix-vector products alone (q/k/v, output, gate/up, down
  for every layer, then the tied head, on its own buffers) and the bandwidth they reach,
  its attention alone (scores, softmax, weighted values, every layer, at this context),
  and the rest (norms, rotary, activations, Python) by difference;
- the bandwidth each whole step reaches streaming the float32 weights (the bound on decode);
- sampling: greedy (an argmax) and top-k 40 / top-p 0.95 / temperature 0.8.
Run: python bench/decode_profile.py [--prompt-tokens 500] [--march haswell]
(--march: the target the C forward pass is built for; the default, native, is what the
daemon builds; haswell is AVX2 without AVX-512. The numpy side then runs OpenBLAS's
kernels for the same target: the bench re-executes itself with OPENBLAS_CORETYPE set,
see kernel_sets.py; it prints which kernel set each side used.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, words  # noqa: E402
from kernel_sets import c_model as c_model_for, cpu_features, match_blas, numpy_blas  # noqa: E402

import numpy as np  # noqa: E402  (after daemon, which imports rkllmd first)

from rkllmd.backends.base import SamplingParams  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402
from rkllmd.backends.cpu.model import KVSlot, Model  # noqa: E402
from rkllmd.sampling import Sampler  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def matrix_products(model: Model) -> None:
    """The numpy step's matrix-vector products, on the model's own decode buffers."""
    w, cfg = model.dense, model.config
    for layer in range(cfg.n_layers):
        np.matmul(w.wqkv[layer], model._h, out=model._qkv)
        np.matmul(w.wo[layer], model._attn.reshape(cfg.n_heads * cfg.head_dim), out=model._proj)
        np.matmul(w.wgu[layer], model._h, out=model._gu)
        np.matmul(w.wd[layer], model._act, out=model._proj)
    np.matmul(w.head, model._h, out=model._logits)


def attention(model: Model, slot: KVSlot, n_keys: int) -> None:
    """The numpy step's attention over ``n_keys`` positions of ``slot``, for every layer."""
    cfg = model.config
    queries = model._rot[: cfg.n_heads].reshape(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)
    scores = model._scores[:, :, :n_keys]
    for layer in range(cfg.n_layers):
        np.matmul(queries, slot.keys[layer][:, :, :n_keys], out=scores)
        totals = model._exp_scores(scores, model._row)
        np.matmul(scores, slot.values[layer][:, :n_keys], out=model._attn)
        model._attn /= totals


def read_limit_ms(arrays: list[np.ndarray], repeat: int) -> float:
    """A plain read of ``arrays``' bytes with every core: the floor under a decode step."""
    slices = [part for a in arrays for part in np.array_split(a.reshape(-1).view(np.uint32), os.cpu_count() or 1)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        def read() -> None:
            list(pool.map(lambda part: np.bitwise_or.reduce(part), slices))
        read()
        return median_ms(read, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--march", default="native", help="target of the C build (default: native)")
    args = parser.parse_args()
    match_blas(args.march)

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_mode="numpy", kernels_dir=KERNELS_DIR)
    backend.load()
    numpy_model = backend.model
    c_model, c_build = c_model_for(backend, args.march)
    text = backend.render([{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}])
    ids = backend.tokenizer.encode(text)[: args.prompt_tokens]
    slots = {"C": c_model.new_slot(), "numpy": numpy_model.new_slot()}
    prefill_s: dict[str, list[float]] = {"C": [], "numpy": []}
    for _ in range(2):
        for label, model in (("C", c_model), ("numpy", numpy_model)):
            t0 = time.perf_counter()
            model.prefill(slots[label], ids, 0)
            prefill_s[label].append(time.perf_counter() - t0)
    tokens = [int(np.argmax(c_model.prefill(slots["C"], ids, 0)))]
    numpy_model.prefill(slots["numpy"], ids, 0)
    for _ in range(args.steps):  # the greedy continuation both steps are timed on
        tokens.append(int(np.argmax(c_model.decode(slots["C"], tokens[-1], len(ids) + len(tokens) - 1))))

    step_times: dict[str, list[float]] = {"C": [], "numpy": []}
    for _ in range(args.rounds):
        for label, model in (("C", c_model), ("numpy", numpy_model)):
            for i in range(args.steps):
                t0 = time.perf_counter()
                model.decode(slots[label], tokens[i], len(ids) + i)
                step_times[label].append((time.perf_counter() - t0) * 1000)
    c_step, numpy_step = (statistics.median(step_times[k]) for k in ("C", "numpy"))
    n_keys = len(ids) + args.steps

    products = median_ms(lambda: matrix_products(numpy_model), args.steps)
    attend = median_ms(lambda: attention(numpy_model, slots["numpy"], n_keys), args.steps)
    logits = c_model._logits
    greedy = Sampler(SamplingParams(temperature=0))
    sampled = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1))
    sample_greedy = median_ms(lambda: greedy.sample(logits, ids), args.steps)
    sample_topk = median_ms(lambda: sampled.sample(logits, ids), args.steps)

    streamed = [a for name, a in c_model.w.arrays().items() if name not in ("attn_norm", "ffn_norm", "output_norm")]
    weight_bytes = sum(a.nbytes for a in streamed)
    limit = read_limit_ms(streamed, args.rounds * 4)
    gbps = lambda ms: weight_bytes / ms / 1e6  # noqa: E731
    print(f"CPU: {cpu_features()}; {os.cpu_count()} cores")
    print(f"C side: {c_build}; numpy side: {numpy_blas()}")
    print(f"limit: a plain read of the {weight_bytes / 1e6:.0f} MB of weights with all cores takes {limit:.2f} ms "
          f"({gbps(limit):.1f} GB/s): at most {1000 / limit:.1f} decode tokens/s")
    print(f"decode: C step {c_step:.2f} ms = **{limit / c_step:.2f} of the limit**; numpy step {limit / numpy_step:.2f}")
    c_prefill, numpy_prefill = (len(ids) / min(prefill_s[k]) for k in ("C", "numpy"))
    print(f"prefill of {len(ids)} tokens (best of 2, alternating): C {c_prefill:.0f} tokens/s, numpy {numpy_prefill:.0f} "
          f"tokens/s: ratio **{c_prefill / numpy_prefill:.2f}x**\n")
    print(f"decode steps at context {len(ids)}-{n_keys}, median of {args.steps} x {args.rounds} each; "
          f"{weight_bytes / 1e6:.0f} MB of weights streamed per step\n")
    print("| step | ms per step | tokens/s | weights streamed at |")
    print("|---|---:|---:|---:|")
    print(f"| C (forward.c) | {c_step:.2f} | {1000 / c_step:.1f} | {gbps(c_step):.1f} GB/s |")
    print(f"| numpy (reference) | {numpy_step:.2f} | {1000 / numpy_step:.1f} | {gbps(numpy_step):.1f} GB/s |")
    print(f"| ratio C / numpy | | **{numpy_step / c_step:.2f}x** | |\n")
    print("The numpy step's parts:\n")
    print("| part | ms per step | share |")
    print("|---|---:|---:|")
    rest = numpy_step - products - attend
    for label, ms in ((f"matrix-vector products (30 layers + head; {gbps(products):.1f} GB/s)", products),
                      ("attention", attend), ("norms, rotary, activations, Python (by difference)", rest)):
        print(f"| {label} | {ms:.2f} | {ms / numpy_step * 100:.0f} % |")
    print(f"\nsampling (not part of the step): greedy {sample_greedy:.3f} ms, "
          f"top-k 40 / top-p 0.95 / T 0.8 {sample_topk:.3f} ms ({sample_topk / c_step * 100:.1f} % of a C step)")


if __name__ == "__main__":
    main()
