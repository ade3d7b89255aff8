"""Our CPU backend against llama.cpp on the same weights, side by side in one run.

Same model (SmolLM2-135M-Instruct), same prompt token ids (our tokenizer's, fed to both),
same greedy decoding, same two threads:
- ours: the float32 forward pass, driven directly (prefill, then decode steps), with its
  C forward pass (forward.c, the default) and with the numpy reference passes (``model.kernels = "numpy"``);
- llama.cpp float32: the bundled Q4_1 file converted to F32 by llama.cpp's own quantize
  tool (the same float32 values our backend dequantizes to);
- llama.cpp Q4_1: the bundled file as it is, for scale (4-bit weights stream 6x fewer bytes).
Prints prefill and decode tokens/s and whether the greedy tokens agree, after the CPU's
features and which build each side runs: our forward.c's target (--march; haswell is AVX2
without AVX-512), numpy's OpenBLAS kernels (matched to --march, see kernel_sets.py) and
llama.cpp's own system info (the instruction sets the installed llama-cpp-python was
compiled for: install an AVX2-only build to compare with --march haswell).

Needs llama-cpp-python (`.venv/bin/pip install -e '.[bench-llama]'`, which builds llama.cpp
from source: about 15 minutes on two cores). Without it the script says so and exits 1.
Run: python bench/llama_cpp_compare.py [--prompt-tokens 500] [--decode-tokens 64] [--march haswell] [--no-q4]
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
from kernel_sets import builds_avx512, c_model, cpu_features, match_blas, numpy_blas  # noqa: E402
from make_llama_references import float32_copy  # noqa: E402  (the F32 copy the test references were made from)

import numpy as np  # noqa: E402  (after daemon, which imports rkllmd first)

from rkllmd.backends.cpu.backend import CpuBackend, bundled_model_path  # noqa: E402
from rkllmd.backends.cpu.model import Model  # noqa: E402

THREADS = 2
OURS = "rkllmd CPU backend (float32, C forward pass)"
_QUIET = None


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
    parser.add_argument("--repeat", type=int, default=3, help="runs of each engine per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rkllmd-bench")
    parser.add_argument("--march", default="native", help="target of our C build (default: native)")
    parser.add_argument("--no-q4", action="store_true",
                        help="leave out llama.cpp's Q4_1 run (its AMX kernels, in a build for a CPU that lists "
                             "AMX, die of SIGILL where a virtual machine does not let them run)")
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
    llama_files = {"llama.cpp, F32 weights": f32, "llama.cpp, Q4_1 weights": source}
    if args.no_q4:
        del llama_files["llama.cpp, Q4_1 weights"]
    for label, path in llama_files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                              verbose=False)
        engines[label] = lambda llm=llm: llama_run(llama_cpp, llm, ids, args.decode_tokens)

    runs: dict[str, list[tuple[float, float, list[int]]]] = {label: [] for label in engines}
    for _ in range(args.rounds):  # rounds, so a disturbance hits every engine alike
        for label, run in engines.items():
            run()  # warm-up: page the weights in, let the other engine's threads go idle
            runs[label].extend(run() for _ in range(args.repeat))

    reference = runs[OURS][0][2]
    print(f"CPU: {cpu_features()}; {os.cpu_count()} cores")
    print(f"ours: {c_build}; numpy passes: {numpy_blas()}")
    system_info = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; {system_info}")
    if ("AVX512 = 1" in system_info) != builds_avx512(args.march):
        print("**the two builds use different vector instruction sets: not a like-for-like comparison**")
    print()
    print(f"{len(ids)} prompt tokens, {args.decode_tokens} decode steps, greedy, {THREADS} threads, "
          f"median of {args.repeat} runs in each of {args.rounds} rounds through the engines\n")
    print("| engine | prefill tokens/s | decode tokens/s | greedy tokens equal to ours |")
    print("|---|---:|---:|---:|")
    for label, results in runs.items():
        prefill = statistics.median(len(ids) / r[0] for r in results)
        decode = statistics.median(args.decode_tokens / r[1] for r in results)
        tokens = results[0][2]
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        print(f"| {label} | {prefill:.0f} | {decode:.1f} | {agree}/{len(tokens)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
