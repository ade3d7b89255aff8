#!/usr/bin/env python3
"""Measure the NPU backend on a board, for the figures no machine without an NPU can give:
time to first token without and with a prompt cache for system prompts of 250 to 2,000
tokens, decode speed, and the first-token time of each turn of a conversation (whole, with
the system prompt's cache, and continuing the runtime's history as rkllmd does).

Run it on the board, from a checkout (or with rkllmd installed), with the daemon
stopped (one process owns the NPU); docs/npu.md says step by step what to run and what
to send back:

    sudo systemctl stop rkllmd
    python3 bench/npu_board.py --model /var/lib/rkllmd/models/qwen2.5-1.5b.rkllm --cpu-mask 0xF0 | tee npu-board.md

``--library`` points at another librkllmrt.so (the tests run this script on the fake
runtime that way). Every case is the same request shape (system prompt + a short
question, greedy):

  no cache                  the whole prompt is prefilled on every request
  prompt cache (first use)  the cache file is loaded, then only the tail is prefilled
  prompt cache (loaded)     the cache is already loaded (the daemon's steady state)

The conversation is run three times: each turn prefilled whole without a cache; whole
with the system prompt's cache loaded; and as rkllmd runs it, continuing the runtime's
history (keep_history = 1: only the new part of each turn is sent). The last case also
prints what rkllm_get_kv_cache_size says the history holds after each turn next to the
prompt and generated tokens (does the history keep the end token? docs/npu.md), and
whether each answer equals the no-cache one (#399 and the NPU's numerics).

Embedding throughput: texts of ``--embed-tokens`` tokens (estimates) embedded as the daemon
does (the runtime's GET_LAST_HIDDEN_LAYER mode, one run per text, mean-pooled), in tokens per
second, next to the prefill rate of the same text sent as a generation's prompt.

With ``--tokenizer`` (the model's tokenizer.json) it also times tokens the daemon samples
itself, from the runtime's logits mode (constrained output, logprobs: one rkllm_run per
token, each chosen token fed back as token input) against tokens the runtime samples
(GENERATE): milliseconds per token, unconstrained and under a JSON Schema (with the
mask's own time per token), and whether the greedy text is the runtime's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rkllmd.backends.base import GenerationStats, PrefixState  # noqa: E402
from rkllmd.sampling import SamplingParams  # noqa: E402
from rkllmd.backends.rkllm.backend import RkllmBackend  # noqa: E402
from rkllmd.backends.rkllm.devices import read_driver  # noqa: E402
from rkllmd.constraints import from_request  # noqa: E402

RULES = (
    "Answer in plain English. Prefer short sentences. Cite the section of the handbook you rely on. "
    "When a question is about safety, say so first. Never guess part numbers; ask for the label. "
    "Units are metric unless the user writes imperial. Dates are ISO 8601. "
)
QUESTION = "Which units should I use?"
TURNS = ("Which units should I use?", "And for temperatures?", "Who do I ask about a missing label?",
         "Summarize the three answers in one line.")
#: The constrained case's schema: an answer the question invites, bounded.
ANSWER = {"type": "object", "properties": {"units": {"type": "string", "maxLength": 80}, "section": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["units", "section"], "additionalProperties": False}


def system_prompt(backend: RkllmBackend, tokens: int) -> str:
    """Handbook-like text of about ``tokens`` tokens (by the backend's estimate)."""
    parts = []
    while backend.count_tokens("".join(parts)) < tokens:
        parts.append(f"Rule {len(parts) + 1}. {RULES}")
    return "".join(parts)


class Bench:
    def __init__(self, backend: RkllmBackend, args: argparse.Namespace, workdir: Path):
        self.backend = backend
        self.args = args
        self.workdir = workdir
        self.params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def generate(self, messages: list[dict[str, str]], prefix: PrefixState | None) -> tuple[GenerationStats, str]:
        pieces: list[str] = []
        prompt = self.backend.render(messages)
        stats = self.backend.generate(prompt, self.params, prefix, lambda text: pieces.append(text) is None)
        return stats, "".join(pieces)

    def cache(self, system: str, name: str) -> tuple[PrefixState, float]:
        """The system prompt's prompt cache, built now; and the build's milliseconds."""
        prefix_text = self.backend.template.cacheable_prefix(system)
        tmp, final = self.workdir / f"{name}.tmp", self.workdir / f"{name}.bin"
        started = time.monotonic()
        n_tokens = self.backend.build_prefix(prefix_text, tmp)
        build_ms = (time.monotonic() - started) * 1e3
        tmp.replace(final)
        payload, _ = self.backend.load_prefix(final, n_tokens)
        return PrefixState(name, prefix_text, n_tokens, payload), build_ms

    def prompt_sizes(self) -> list[dict]:
        rows = []
        for size in self.args.system_tokens:
            system = system_prompt(self.backend, size)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
            cold = [self.generate(messages, None)[0] for _ in range(self.args.runs)]
            prefix, build_ms = self.cache(system, f"system-{size}")
            first = [self.generate(messages, prefix)[0]]
            loaded = [self.generate(messages, prefix)[0] for _ in range(self.args.runs)]
            for case, runs in (("no cache", cold), ("prompt cache (first use)", first),
                               ("prompt cache (loaded)", loaded)):
                rows.append(_row(size, case, runs) | {"cache_build_ms": round(build_ms)})
        return rows

    def conversation(self) -> list[dict]:
        system = system_prompt(self.backend, self.args.conversation_tokens)
        prefix, _ = self.cache(system, "conversation")
        rows = []
        cold_replies: list[str] = []
        for label in ("no cache", "prompt cache", "history"):
            messages = [{"role": "system", "content": system}]
            for turn, question in enumerate(TURNS, 1):
                messages.append({"role": "user", "content": question})
                use = {"no cache": None, "prompt cache": prefix}.get(label, prefix)
                if label == "history":  # as the daemon chooses: the runtime's history when the prompt continues it
                    use = self.backend.resumable(self.backend.render(messages)) or prefix
                stats, reply = self.generate(messages, use)
                messages.append({"role": "assistant", "content": reply})
                if label == "no cache":
                    cold_replies.append(reply)
                rows.append({"turn": turn, "case": label, "prompt_tokens": stats.prompt_tokens,
                             "prefilled_tokens": stats.prompt_tokens - stats.cached_tokens,
                             "cached_tokens": stats.cached_tokens, "ttft_ms": round(stats.ttft_ms, 1),
                             "kv_after": self.backend.kv_cache_size(),
                             "prompt_plus_generated": stats.prompt_tokens + stats.completion_tokens,
                             "same_as_no_cache": reply == cold_replies[turn - 1]})
        return rows


    def embeddings(self) -> list[dict]:
        """Embedding tokens/s (GET_LAST_HIDDEN_LAYER) against the prefill tokens/s of the same text."""
        rows = []
        for size in self.args.embed_tokens:
            text = system_prompt(self.backend, size)
            seconds, tokens = [], 0
            for _ in range(self.args.runs):
                started = time.monotonic()
                [(_, tokens)] = self.backend.embed([text], lambda: None)
                seconds.append(time.monotonic() - started)
            prefills = [self.generate([{"role": "user", "content": text}], None)[0] for _ in range(self.args.runs)]
            prefill_rates = [s.prompt_tokens / s.prefill_ms * 1e3 for s in prefills if s.prefill_ms > 0]
            rows.append({"text_tokens": size, "runs": self.args.runs, "embedded_tokens": tokens,
                         "embed_ms": round(statistics.median(seconds) * 1e3, 1),
                         "embed_tok_s": round(tokens / statistics.median(seconds), 1),
                         "prefill_tok_s": round(statistics.median(prefill_rates), 1) if prefill_rates else None,
                         "dimensions": self.backend.embedding_size()})
        return rows

    def sampling(self) -> list[dict]:
        """The same greedy request, sampled by the runtime, by the daemon, by the daemon under a schema."""
        messages = [{"role": "system", "content": system_prompt(self.backend, 250)}, {"role": "user", "content": QUESTION}]
        prompt = self.backend.render(messages)
        rows, runtime_text = [], None
        for case, params in (("runtime samples (GENERATE)", self.params),
                             ("daemon samples (GET_LOGITS)", SamplingParams(max_tokens=self.args.max_tokens, logprobs=0)),
                             ("daemon samples, JSON Schema", SamplingParams(max_tokens=self.args.max_tokens, constraint=from_request(format=ANSWER)))):
            runs = [self._sample(prompt, params) for _ in range(self.args.runs)]
            stats, text, guide = runs[-1]
            runtime_text = text if runtime_text is None else runtime_text
            per_token = [s.decode_ms / (s.completion_tokens - (0 if params is self.params else 1))
                         for s, _, _ in runs if s.completion_tokens > 1]
            rows.append({"case": case, "runs": len(runs), "completion_tokens": stats.completion_tokens,
                         "ttft_ms": round(statistics.median(s.ttft_ms for s, _, _ in runs), 1),
                         "ms_per_token": round(statistics.median(per_token), 2) if per_token else None,
                         "mask_ms_per_token": round(guide.mask_s / guide.masks * 1e3, 3) if guide and guide.masks else None,
                         "same_text_as_runtime": text == runtime_text if params.constraint is None else None})
        return rows

    def _sample(self, prompt: str, params: SamplingParams):
        pieces: list[str] = []
        run = self.backend.start(prompt, params, None, lambda text: pieces.append(text) is None)
        while not run.done:
            self.backend.step([run])
        self.backend.release(run)
        return run.stats, "".join(pieces), getattr(getattr(run, "sampler", None), "guide", None)


def _row(size: int, case: str, runs: list[GenerationStats]) -> dict:
    decode_ms = statistics.median(s.decode_ms for s in runs)
    last = runs[-1]
    return {
        "system_tokens": size, "case": case, "runs": len(runs),
        "ttft_ms": round(statistics.median(s.ttft_ms for s in runs), 1),
        "prefilled_tokens": last.prompt_tokens - last.cached_tokens, "cached_tokens": last.cached_tokens,
        "completion_tokens": last.completion_tokens,
        "decode_tok_s": round(last.completion_tokens / decode_ms * 1e3, 1) if decode_ms > 0 else None,
    }


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip("\x00\n ")
    except OSError:
        return "unknown"


def table(rows: list[dict], columns: dict[str, str]) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("n/a" if row[k] is None else str(row[k]) for k in columns) + " |")
    return lines


def sizes(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help=".rkllm model file")
    parser.add_argument("--library", type=Path, help="librkllmrt.so (default: the usual install locations)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "1.2", "1.3"])
    parser.add_argument("--template", default="qwen2.5-instruct")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--cpu-mask", type=lambda v: int(v, 0), default=0, help="e.g. 0xF0 for the big cores")
    parser.add_argument("--system-tokens", type=sizes, default=[250, 500, 1000, 2000],
                        help="system prompt sizes, comma-separated (default 250,500,1000,2000)")
    parser.add_argument("--conversation-tokens", type=int, default=1000, help="the conversation's system prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="where the prompt cache files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--tokenizer", type=Path, help="the model's tokenizer.json: also time tokens the daemon samples (logits mode)")
    parser.add_argument("--embed-tokens", type=sizes, default=[128, 512],
                        help="sizes of the texts embedded, comma-separated (default 128,512)")
    args = parser.parse_args(argv)

    backend = RkllmBackend(args.model, library=args.library, runtime=args.runtime, template=args.template,
                           context_length=args.context_length, cpu_mask=args.cpu_mask, tokenizer=args.tokenizer)
    started = time.monotonic()
    backend.load()
    load_s = time.monotonic() - started
    try:
        with tempfile.TemporaryDirectory(prefix="rkllmd-bench-") as scratch:
            workdir = args.workdir or Path(scratch)
            workdir.mkdir(parents=True, exist_ok=True)
            bench = Bench(backend, args, workdir)
            prompts, turns, embedded = bench.prompt_sizes(), bench.conversation(), bench.embeddings()
            sampled = bench.sampling() if args.tokenizer else []
        facts = backend.describe()
    finally:
        backend.close()

    setup = {
        "board": read("/proc/device-tree/model"), "kernel": platform.release(),
        "npu_driver": read_driver().text or read_driver().why, "runtime": facts.get("runtime"),
        "library": facts.get("library"), "model": str(args.model),
        "model_mib": round(os.path.getsize(args.model) / 2**20), "load_s": round(load_s, 1),
        "template": args.template, "context_length": args.context_length, "cpu_mask": hex(args.cpu_mask),
        "max_tokens": args.max_tokens, "runs": args.runs,
    }
    out = ["## rkllmd NPU benchmark", ""]
    out += [f"- {key}: {value}" for key, value in setup.items()]
    out += ["", f"### Time to first token without and with a prompt cache (question {QUESTION!r}, "
                f"greedy, median of {args.runs} runs)", ""]
    out += table(prompts, {"system_tokens": "system tokens (estimate)", "case": "case", "ttft_ms": "TTFT ms",
                           "prefilled_tokens": "prefilled tokens", "cached_tokens": "cached tokens",
                           "completion_tokens": "completion tokens", "decode_tok_s": "decode tok/s",
                           "cache_build_ms": "cache build ms"})
    out += ["", f"### A conversation (system prompt ~{args.conversation_tokens} tokens; each turn sends the whole "
                "conversation, or only its new part when continuing the runtime's history)", ""]
    out += table(turns, {"turn": "turn", "case": "case", "prompt_tokens": "prompt tokens",
                         "prefilled_tokens": "prefilled tokens", "cached_tokens": "cached tokens", "ttft_ms": "TTFT ms",
                         "kv_after": "KV size after", "prompt_plus_generated": "prompt + generated",
                         "same_as_no_cache": "same answer as no cache"})
    out += ["", f"### Embeddings (the runtime's last hidden layer, mean-pooled by the daemon; one run per text; "
                f"median of {args.runs} runs) against the prefill of the same text as a prompt", ""]
    out += table(embedded, {"text_tokens": "text tokens (estimate)", "embedded_tokens": "tokens embedded", "embed_ms": "ms per text",
                            "embed_tok_s": "embedding tok/s", "prefill_tok_s": "prefill tok/s (generation)", "dimensions": "dimensions"})
    if sampled:
        out += ["", f"### Tokens the daemon samples (logits mode: one run per token) against the runtime's own (system prompt ~250 tokens, "
                    f"greedy, median of {args.runs} runs; ms per token after the first)", ""]
        out += table(sampled, {"case": "case", "completion_tokens": "completion tokens", "ttft_ms": "TTFT ms",
                               "ms_per_token": "ms per token", "mask_ms_per_token": "mask ms per token",
                               "same_text_as_runtime": "same text as the runtime's"})
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "prompt_sizes": prompts, "conversation": turns, "embeddings": embedded, "sampling": sampled}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
