"""Our CPU backend against llama.cpp on the same weights, side by side in one run.

Same model (SmolLM2-135M-Instruct), same prompt token ids (our tokenizer's, fed to both),
same greedy decoding, same two threads:
- ours: the float32 forward pass, driven directly (prefill, then decode steps), with its
  C forward pass (forward.c, the default) and with the numpy reference passes (``model.kernels = "numpy"``);
- llama.cpp at the weights its users pick, as rows of the same table: F32 (the bundled
  Q4_1 file converted by llama.cpp's own quantize, the same float32 values our backend
  dequantizes to), Q8_0 and Q4_K_M (quantized by llama.cpp from that F32 copy, as its
  users make them), and the bundled Q4_1 file as it is (--formats picks among them).
Each round runs every engine once (after a warm-up in the first), and the read probe
(bench/read_limit.c, all cores) once; every figure is min/median/max over --rounds (5).
Prints prefill and decode tokens/s, each engine's decode against ours, the bytes of
weights each streams a token and its decode against the limit those bytes allow at the
probe's bandwidth (the same machine limit for every engine), and whether the greedy
tokens agree with ours (quantized weights give other logits: they may not), after the CPU's
features and which build each side runs: our forward.c's target (--march; haswell is AVX2
without AVX-512), numpy's OpenBLAS kernels (matched to --march, see kernel_sets.py) and
llama.cpp's own system info (the instruction sets the installed llama-cpp-python was
compiled for: install an AVX2-only build to compare with --march haswell).

Needs llama-cpp-python (`.venv/bin/pip install -e '.[bench-llama]'`, which builds llama.cpp
from source: about 15 minutes on two cores). Without it the script says so and exits 1.
The wheels built here: `.venv/bin/pip install --no-deps /work/wheels/native/*.whl diskcache`
(this CPU's instruction sets), or /work/wheels/avx2/ (AVX2 only; for --march haswell).
Run: python bench/llama_cpp_compare.py [--rounds 5] [--prompt-tokens 500] [--decode-tokens 64] [--march haswell]
[--formats F32,Q8_0,Q4_K_M,Q4_1] (about 3 minutes; quick: --rounds 5 --decode-tokens 32 --prompt-tokens 250).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from daemon import WEIGHTS_DIR, words  # noqa: E402
import read_limit  # noqa: E402  (after daemon, which imports rkllmd first)
from kernel_sets import builds_avx512, c_model, cpu_features, match_blas, numpy_blas  # noqa: E402
from make_llama_references import float32_copy  # noqa: E402  (the F32 copy the test references were made from)

import numpy as np  # noqa: E402  (after daemon, which imports rkllmd first)

from rkllmd.backends.cpu.backend import CpuBackend, bundled_model_path  # noqa: E402
from rkllmd.backends.cpu.model import Model  # noqa: E402

THREADS = 2
#: llama.cpp's weight formats: the ftype its quantize makes each from the F32 copy (None: the bundled file, or F32 itself).
FORMATS = {"F32": None, "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_1": None}
OURS = "rkllmd CPU backend (float32, C forward pass)"
_QUIET = None


def quantized_copy(llama_cpp, f32: Path, fmt: str) -> Path:
    """``f32`` quantized to ``fmt`` by llama.cpp's own quantize (made once, kept beside it)."""
    target = f32.with_name(f32.name.replace(".F32.", f".{fmt}."))
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, FORMATS[fmt])
        params.nthread = THREADS
        partial = target.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize the model to {fmt}")
        partial.rename(target)
    return target


def weight_bytes(llama_cpp, llm) -> int:
    """Bytes of a loaded model's tensors (llama.cpp's count): what a decode step reads
    (SmolLM2's output head is its token embedding, read whole every step)."""
    return int(llama_cpp.llama_model_size(llm.model))


def spread(values: list[float], fmt: str = ".1f") -> str:
    """min/median/max of a figure's runs."""
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def ours_run(model: Model, ids: list[int], steps: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode s for ``steps`` tokens, greedy tokens)."""
    slot = model.new_slot()
    t0 = time.perf_counter()
    logits = model.prefill(slot, ids, 0)
    t1 = time.perf_counter()
    out = [int(np.argmax(logits))]
    for step in range(steps):
        logits = model.decode(slot, out[-1], len(ids) + step)
        out.append(int(np.argmax(logits)))
    return t1 - t0, time.perf_counter() - t1, out


def llama_run(llama_cpp, llm, ids: list[int], steps: int) -> tuple[float, float, list[int]]:
    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    out = [next_token()]
    for _ in range(steps):
        llm.eval([out[-1]])
        out.append(next_token())
    return t1 - t0, time.perf_counter() - t1, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds through every engine (min/median/max over them)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rkllmd-bench")
    parser.add_argument("--march", default="native", help="target of our C build (default: native)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="llama.cpp's weight formats to run (leave out Q4_1 where a build's AMX kernels die of "
                             "SIGILL: a build for a CPU that lists AMX, in a virtual machine that does not let them run)")
    args = parser.parse_args()
    match_blas(args.march)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `.venv/bin/pip install -e '.[bench-llama]'` "
              "(builds llama.cpp from source), then run this again.", file=sys.stderr)
        return 1

    # llama.cpp logs every tensor it converts or loads; keep the table readable. The
    # callback must outlive the models (their destructors log at exit): keep it global.
    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())

    source = bundled_model_path()
    f32 = float32_copy(llama_cpp, source, args.workdir)
    ours_numpy = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_mode="numpy")
    ours_numpy.load()
    ours, c_build = c_model(ours_numpy, args.march)
    text = ours_numpy.render([{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}])
    ids = ours_numpy.tokenizer.encode(text)
    n_ctx = len(ids) + args.decode_tokens + 8
    engines = {
        OURS: lambda: ours_run(ours, ids, args.decode_tokens),
        "rkllmd CPU backend (float32, numpy passes)": lambda: ours_run(ours_numpy.model, ids, args.decode_tokens),
    }
    streamed = dict.fromkeys(engines, read_limit.streamed_bytes(ours.w))
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            raise SystemExit(f"--formats: {fmt} is none of {', '.join(FORMATS)}")
        path = f32 if fmt == "F32" else source if fmt == "Q4_1" else quantized_copy(llama_cpp, f32, fmt)
        label = f"llama.cpp, {fmt} weights" + (" (the bundled file)" if fmt == "Q4_1" else "")
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                              verbose=False)
        engines[label] = lambda llm=llm: llama_run(llama_cpp, llm, ids, args.decode_tokens)
        streamed[label] = weight_bytes(llama_cpp, llm)

    runs: dict[str, list[tuple[float, float, list[int]]]] = {label: [] for label in engines}
    bandwidths: list[float] = []  # GB/s, the probe's best stream count each round
    for run in engines.values():
        run()  # warm-up: page the weights in
    for _ in range(args.rounds):  # rounds, so a disturbance hits every engine alike
        bandwidths.append(read_limit.measure(streamed[OURS], args.march, rounds=3).best_gbps)
        for label, run in engines.items():
            runs[label].append(run())

    reference = runs[OURS][0][2]
    print(f"CPU: {cpu_features()}; {os.cpu_count()} cores")
    print(f"ours: {c_build}; numpy passes: {numpy_blas()}")
    system_info = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; {system_info}")
    if ("AVX512 = 1" in system_info) != builds_avx512(args.march):
        print("**the two builds use different vector instruction sets: not a like-for-like comparison**")
    print()
    print(f"{len(ids)} prompt tokens, {args.decode_tokens} decode steps, greedy, {THREADS} threads, "
          f"{args.rounds} rounds through the engines; min/median/max over the rounds; probe "
          f"{spread(bandwidths)} GB/s (read_limit.c, {streamed[OURS] / 1e6:.0f} MB, all cores)\n")
    print("| engine | prefill tokens/s | decode tokens/s | decode / ours | MB read a token | decode / its limit | "
          "greedy tokens equal to ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ours_decode = [args.decode_tokens / r[1] for r in runs[OURS]]
    for label, results in runs.items():
        prefill = [len(ids) / r[0] for r in results]
        decode = [args.decode_tokens / r[1] for r in results]
        of_limit = [tps * streamed[label] / (gbps * 1e9) for tps, gbps in zip(decode, bandwidths)]
        tokens = results[0][2]
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        print(f"| {label} | {spread(prefill, '.0f')} | {spread(decode)} | "
              f"{spread([d / o for d, o in zip(decode, ours_decode)], '.2f')} | {streamed[label] / 1e6:.0f} | "
              f"{spread(of_limit, '.2f')} | {agree}/{len(tokens)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
