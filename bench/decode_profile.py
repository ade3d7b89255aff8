"""Where a decode step's time goes, for the C step and the numpy reference step, against
this machine's memory-bandwidth limit; and prefill, C against numpy.

Prints the CPU's vector features, then, after a prompt of --prompt-tokens, in one run,
on the same mapped weights:
- the limit: read_limit.c (a STREAM-style probe built with forward.c's flags) reading the
  weights a decode step streams, in their own mapping (the same pages, of the same size),
  best of 1..16 streams per thread on all cores or on one (the teams forward.c decodes
  with), in tokens/s (bandwidth / bytes per token);
- decode through a real daemon (``decode_tps`` of a greedy answer of --decode-tokens
  after the prompt; its forward.c built for --march) and its ratio to the limit, each
  run's probe and answer side by side; a best ratio above 1.0 is a probe bug (exit 1);
  the ratio again over the runs whose memory kept its mode through the answer (a probe
  after it, one round, within MODE_CHANGE of the one before);
- for scale, the keys and values a step's attention reads besides the weights (at the
  answer's mean position) and the limit counting them too;
- prefill of the prompt, the C forward pass against numpy's, alternating;
- the whole step (``Model.decode``) in process with the C step (forward.c) and with the
  numpy reference (``model.kernels = "numpy"``), median over --steps steps per run;
- the numpy step's parts: its matrix-vector products alone (q/k/v, output, gate/up, down
  for every layer, then the tied head, on its own buffers) and the bandwidth they reach,
  its attention alone (scores, softmax, weighted values, every layer, at this context),
  and the rest (norms, rotary, activations, Python) by difference;
- sampling: greedy (an argmax) and top-k 40 / top-p 0.95 / temperature 0.8.
Every figure is min/median/max over --runs (5) runs, each run doing every part once.
Run: python bench/decode_profile.py [--runs 5] [--prompt-tokens 500] [--march haswell]
(about 2 minutes; quick: --runs 3 --steps 16 --decode-tokens 32).
(--march: the target the C forward pass is built for, in process and in the daemon
(bench's daemon gets a compiler appending -march, see kernel_sets.daemon_env); the
default, native, is what the daemon builds; haswell is AVX2 without AVX-512. The numpy side then runs OpenBLAS's
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
from daemon import KERNELS_DIR, WEIGHTS_DIR, running_daemon, words  # noqa: E402
import read_limit  # noqa: E402  (after daemon, which imports rkllmd first)
from kernel_sets import c_model as c_model_for, cpu_features, daemon_env, match_blas, numpy_blas  # noqa: E402

import numpy as np  # noqa: E402  (after daemon, which imports rkllmd first)

from rkllmctl import Client  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402
from rkllmd.backends.cpu.model import KVSlot, Model  # noqa: E402
from rkllmd.sampling import Sampler, SamplingParams  # noqa: E402


#: A probe after a daemon answer this far from the one before: the VM's memory changed mode
#: during the answer (it switches between ~52 and ~85 GB/s within seconds), and that run's
#: ratio compares the answer with a limit it did not run under.
MODE_CHANGE = 0.10


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
        keys, values = slot.read(0, n_keys, layer)
        np.matmul(queries, keys, out=scores)
        totals = model._exp_scores(scores, model._row)
        np.matmul(scores, values, out=model._attn)
        model._attn /= totals


def spread(values: list[float], fmt: str = ".1f") -> str:
    """min/median/max of a figure's runs."""
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def daemon_decode_tps(client: Client, messages: list[dict[str, str]], tokens: int) -> float:
    """The daemon's decode rate (its stats: tokens after the first / decode time) for one greedy answer."""
    result = client.generate(messages=messages, max_tokens=tokens, temperature=0, no_cache=True).wait()
    if result.stats["completion_tokens"] < tokens // 2:
        raise RuntimeError(f"the answer stopped after {result.stats['completion_tokens']} tokens: too few to time")
    return result.stats["decode_tps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens each daemon answer decodes")
    parser.add_argument("--steps", type=int, default=32, help="in-process decode steps timed per run and side")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--probe-rounds", type=int, default=3, help="rounds of every stream count per run (best kept)")
    parser.add_argument("--march", default="native", help="target of the C build (default: native)")
    args = parser.parse_args()
    match_blas(args.march)

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_mode="numpy", kernels_dir=KERNELS_DIR)
    backend.load()
    numpy_model = backend.model
    c_model, c_build = c_model_for(backend, args.march)
    messages = [{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}]
    ids = backend.tokenizer.encode(backend.render(messages))[: args.prompt_tokens]
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
        logits = c_model.decode(slots["C"], tokens[-1], len(ids) + len(tokens) - 1)  # the last: what sampling is timed on
        tokens.append(int(np.argmax(logits)))
    weight_bytes = read_limit.streamed_bytes(c_model.w)
    n_keys = len(ids) + args.steps

    # Each run: the probe (every stream count once), the daemon's answer, the in-process steps, side by side.
    limits: list[float] = []  # GB/s, each run's best stream count
    daemon_tps: list[float] = []
    step_ms: dict[str, list[float]] = {"C": [], "numpy": []}
    parts: dict[str, list[float]] = {"products": [], "attention": []}
    probe_runs = []
    steady: list[bool] = []  # the probe after the answer within MODE_CHANGE of the one before
    with running_daemon(env=daemon_env(args.march)) as daemon, Client(daemon.socket, timeout=600) as client:
        kernel = client.status()["model"]["decode"]
        daemon_decode_tps(client, messages, 8)  # warm-up: the daemon's first answer
        for _ in range(args.runs):
            probe = read_limit.measure(weight_bytes, args.march, rounds=args.probe_rounds, weights=c_model.w)
            probe_runs.append(probe)
            limits.append(probe.best_gbps)
            daemon_tps.append(daemon_decode_tps(client, messages, args.decode_tokens))
            after = read_limit.measure(weight_bytes, args.march, rounds=1, weights=c_model.w)
            steady.append(abs(after.best_gbps / probe.best_gbps - 1) <= MODE_CHANGE)
            for label, model in (("C", c_model), ("numpy", numpy_model)):
                times = []
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    model.decode(slots[label], tokens[i], len(ids) + i)
                    times.append((time.perf_counter() - t0) * 1000)
                step_ms[label].append(statistics.median(times))
            parts["products"].append(median_ms(lambda: matrix_products(numpy_model), args.steps))
            parts["attention"].append(median_ms(lambda: attention(numpy_model, slots["numpy"], n_keys), args.steps))

    greedy = Sampler(SamplingParams(temperature=0))
    sampled = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1))
    sample_greedy = median_ms(lambda: greedy.sample(logits, ids), args.steps)
    sample_topk = median_ms(lambda: sampled.sample(logits, ids), args.steps)

    limit_tps = [gb * 1e9 / weight_bytes for gb in limits]
    cfg = c_model.config  # keys and values of every layer and KV head, 4 bytes each, at the answer's mean position
    mean_position = len(ids) + args.decode_tokens / 2
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * mean_position
    with_kv_tps = [gb * 1e9 / (weight_bytes + kv_bytes) for gb in limits]
    ratios = [tps / lim for tps, lim in zip(daemon_tps, limit_tps)]
    c_tps = [1000 / ms for ms in step_ms["C"]]
    numpy_tps = [1000 / ms for ms in step_ms["numpy"]]
    best_ratio = max(daemon_tps) / max(limit_tps)
    streams = sorted({f"{p.best_streams}x{p.threads}" for p in probe_runs})
    print(f"CPU: {cpu_features()}; {os.cpu_count()} cores")
    print(f"C side: {c_build}; daemon: {kernel}; numpy side: {numpy_blas()}")
    print(f"{args.runs} runs, each: the probe, a daemon answer of {args.decode_tokens} tokens after {len(ids)} prompt "
          f"tokens, {args.steps} in-process steps per side; figures min/median/max over the runs\n")
    print("| figure | min/median/max |")
    print("|---|---:|")
    print(f"| limit: read_limit.c over {weight_bytes / 1e6:.1f} MB (the weights a step streams; read: "
          f"{probe_runs[0].memory}), best of 1-16 streams per thread on all cores or one "
          f"({', '.join(streams)} streams x threads best) "
          f"| {spread(limits, '.2f')} GB/s |")
    print(f"| limit in tokens/s (bytes per token / bandwidth) | {spread(limit_tps)} |")
    print(f"| decode through the daemon (its decode_tps) | {spread(daemon_tps)} tokens/s |")
    print(f"| **daemon decode / limit** (each run's side by side) | **{spread(ratios, '.2f')}** |")
    kept = [r for r, ok in zip(ratios, steady) if ok]
    print(f"| daemon decode / limit, the {len(kept)} of {len(ratios)} runs whose probe after the answer was within "
          f"{MODE_CHANGE:.0%} of the one before | {spread(kept, '.2f') if kept else 'none'} |")
    print(f"| for scale: keys and values a step's attention reads at position {mean_position:.0f} "
          f"({kv_bytes / 1e6:.1f} MB, {kv_bytes / weight_bytes * 100:.1f} % of the weights); limit counting them too "
          f"| {spread(with_kv_tps)} tokens/s |")
    print(f"| daemon decode / that limit | {spread([t / l for t, l in zip(daemon_tps, with_kv_tps)], '.2f')} |")
    print(f"| C step in process (forward.c, median of {args.steps}) | {spread(c_tps)} tokens/s |")
    print(f"| C step in process / limit | {spread([t / l for t, l in zip(c_tps, limit_tps)], '.2f')} |")
    print(f"| numpy step (reference) | {spread(numpy_tps)} tokens/s |")
    print(f"| C step / numpy step | {spread([c / n for c, n in zip(c_tps, numpy_tps)], '.2f')}x |")
    print(f"\nbest daemon decode / best limit: {max(daemon_tps):.1f} / {max(limit_tps):.1f} = **{best_ratio:.2f}**")
    c_prefill, numpy_prefill = (len(ids) / min(prefill_s[k]) for k in ("C", "numpy"))
    print(f"prefill of {len(ids)} tokens (best of 2, alternating): C {c_prefill:.0f} tokens/s, numpy {numpy_prefill:.0f} "
          f"tokens/s: ratio **{c_prefill / numpy_prefill:.2f}x**\n")
    print("The numpy step's parts (min/median/max over the runs of each run's median):\n")
    print("| part | ms per step | share of the median step |")
    print("|---|---:|---:|")
    numpy_step = statistics.median(step_ms["numpy"])
    rest = [s - p - a for s, p, a in zip(step_ms["numpy"], parts["products"], parts["attention"])]
    product_gbps = statistics.median(weight_bytes / ms / 1e6 for ms in parts["products"])
    for label, ms in ((f"matrix-vector products (30 layers + head; {product_gbps:.1f} GB/s)", parts["products"]),
                      ("attention", parts["attention"]), ("norms, rotary, activations, Python (by difference)", rest)):
        print(f"| {label} | {spread(ms, '.2f')} | {statistics.median(ms) / numpy_step * 100:.0f} % |")
    print(f"\nsampling (not part of the step): greedy {sample_greedy:.3f} ms, "
          f"top-k 40 / top-p 0.95 / T 0.8 {sample_topk:.3f} ms")
    if best_ratio > 1.0:
        print(f"PROBE BUG: the daemon decoded faster than the probe's limit allows ({best_ratio:.2f} > 1): "
              "the probe under-reads", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
