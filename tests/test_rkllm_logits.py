"""The NPU backend samples itself, from the runtime's logits mode (GET_LOGITS), for constrained
output and logprobs: on the fake runtime of each interface generation.

The fake (tests/fake_rkllm/fake_rkllm.c, "Logits mode") returns deterministic pseudo-logits of
what it has seen: FNV-1a 64 of those bytes, then splitmix64 per token id. So this test can
compute, independently of the backend, what a masked greedy decoding must produce: the
argmax of the allowed tokens at each step, each chosen token fed back as token input
("<[id]>" in what the fake sees). The fake hands two rows (a decoy, then the last
position's): only the last row gives the expected tokens. The vocabulary is SmolLM2's,
from a tokenizer.json made of its GGUF (what a converted model comes with).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import llguidance
import numpy as np
import pytest
from fake_rkllm.build import write_model

from conftest import DaemonProcess
from gguf_files import tokenizer_json
from rkllmctl import DaemonError
from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.rkllm.backend import RkllmBackend
from rkllmd.constraints import ConstraintError, from_request
from rkllmd.sampling import SamplingParams
from test_rkllm_backend import calls  # noqa: F401  (the fake's call log, a fixture)

VOCAB = 49152
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
MASK64 = (1 << 64) - 1


def pseudo_logits(seen: bytes) -> np.ndarray:
    """The fake's logits of what it has seen (its pseudo_logits, in numpy)."""
    h = 14695981039346656037
    for byte in seen:
        h = ((h ^ byte) * 1099511628211) & MASK64
    with np.errstate(over="ignore"):
        x = np.uint64(h) + np.arange(VOCAB, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(40)).astype(np.float32) / np.float32(1048576) - np.float32(8)


def expected_greedy(tokenizer_text: str, prompt: str, grammar: str, end_ids: set[int], limit: int) -> tuple[list[int], float, bool]:
    """The tokens a masked greedy decoding on the fake must give, the first one's
    log-probability over the allowed tokens, and whether an end token ended it (rather
    than the grammar, complete, allowing nothing more)."""
    tokenizer = llguidance.LLTokenizer(tokenizer_text, eos_token=sorted(end_ids))
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    seen, out, first, by_end = prompt.encode(), [], None, False
    while len(out) < limit:
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")[:VOCAB].astype(bool)
        logits = np.where(bits, pseudo_logits(seen), -np.inf)
        token = int(np.argmax(logits))
        if first is None:
            values = logits[bits].astype(np.float64)
            first = float(logits[token] - (values.max() + np.log(np.exp(values - values.max()).sum())))
        if token in end_ids:
            by_end = True
            break
        out.append(token)
        assert matcher.consume_token(token)
        if matcher.is_stopped():
            break
        seen += f"<[{token}]>".encode()
    return out, first, by_end


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(tokenizer_json(GGUFFile(bundled_model_path()).metadata))
    return path


@pytest.fixture(params=("1.2", "1.3"))
def backend(request, fake_runtime, tmp_path, tokenizer_file, calls):  # noqa: F811
    model = write_model(tmp_path / "tiny.rkllm", f"a fake .rkllm model vocab_size={VOCAB}\n")
    b = RkllmBackend(model, library=fake_runtime[request.param], template="smollm2-instruct", tokenizer=tokenizer_file)
    b.load()
    calls()
    yield b
    b.close()


def run(backend: RkllmBackend, prompt: str, params: SamplingParams):
    pieces: list[str] = []
    generation = backend.start(prompt, params, None, lambda text: pieces.append(text) or True)
    while not generation.done:
        backend.step([generation])
    return "".join(pieces), generation


def test_a_constrained_generation_is_the_masked_greedy_decoding_of_the_runtimes_logits(backend, tokenizer_file, calls) -> None:  # noqa: F811
    prompt = backend.render([{"role": "user", "content": "Is the sky blue?"}])
    constraint = from_request(format=FLAG)
    text, generation = run(backend, prompt, SamplingParams(max_tokens=64, constraint=constraint, logprobs=2))
    tokens, first_logprob, by_end = expected_greedy(tokenizer_file.read_text(), prompt, constraint.grammar, set(backend.vocabulary.end_ids), 64)
    assert text == backend.vocabulary.tokenizer.decode_str(tokens)
    jsonschema.validate(json.loads(text), FLAG)
    stats = generation.stats
    assert stats.finish_reason == "stop" and stats.completion_tokens == len(tokens)
    assert stats.prompt_tokens == len(prompt.encode())  # the runtime's count: a byte a token in the fake
    assert [e["bytes"] for e in generation.logprobs] == [list(backend.vocabulary.token_bytes[t]) for t in tokens]
    assert generation.logprobs[0]["logprob"] == pytest.approx(first_logprob, abs=1e-9)
    # One logits-mode run per token, history kept: the prompt, then each chosen token (the
    # last one too when the end token came after it; not when the grammar allowed nothing more).
    runs = [args for name, args in calls() if name == "rkllm_run"]
    fed = len(tokens) if by_end else len(tokens) - 1
    assert [(r["mode"], r["input"], r["keep_history"]) for r in runs] == [("2", "prompt", "1")] + [("2", "token", "1")] * fed


def test_logprobs_alone_sample_from_the_logits_too_and_max_tokens_cuts(backend, calls) -> None:  # noqa: F811
    prompt = backend.render([{"role": "user", "content": "Hi"}])
    text, generation = run(backend, prompt, SamplingParams(max_tokens=3, logprobs=0))
    assert generation.stats.finish_reason == "length" and generation.stats.completion_tokens == 3 == len(generation.logprobs)
    assert b"".join(bytes(e["bytes"]) for e in generation.logprobs).decode("utf-8", "replace") == text
    assert all(r["mode"] == "2" for name, r in calls() if name == "rkllm_run")
    # Without them the runtime samples, as before: one GENERATE run.
    _, plain = run(backend, prompt, SamplingParams(max_tokens=3))
    assert [r["mode"] for name, r in calls() if name == "rkllm_run"] == ["0"] and plain.logprobs == []


def test_without_the_models_tokenizer_the_request_is_refused(fake_runtime, tmp_path) -> None:
    model = write_model(tmp_path / "tiny.rkllm", f"a fake .rkllm model vocab_size={VOCAB}\n")
    b = RkllmBackend(model, library=fake_runtime["1.2"])
    b.load()
    try:
        with pytest.raises(ConstraintError, match=r"\[rkllm\] tokenizer"):
            b.start("x", SamplingParams(constraint=from_request(format="json")), None, lambda text: True)
    finally:
        b.close()


def test_the_daemon_serves_structured_output_on_the_npu(fake_runtime, tokenizer_file) -> None:
    from test_rkllm_daemon import NpuDaemon

    with_tokenizer = NpuDaemon(fake_runtime["1.3"], model_text=f"a fake .rkllm model vocab_size={VOCAB}\n",
                               env={"RKLLMD_RKLLM_TOKENIZER": str(tokenizer_file)})
    without: DaemonProcess = NpuDaemon(fake_runtime["1.3"], model_text=f"a fake .rkllm model vocab_size={VOCAB}\n")
    try:
        with with_tokenizer.start().client() as client:
            result = client.generate("Is the sky blue?", format=FLAG, max_tokens=64, logprobs=True).wait()
            assert result.finish_reason == "stop" and len(result.logprobs) == result.stats["completion_tokens"]
            jsonschema.validate(json.loads(result.text), FLAG)
        with without.start().client() as client:
            with pytest.raises(DaemonError) as refused:
                client.generate("Is the sky blue?", format=FLAG).wait()
            assert refused.value.name == "invalid_field" and "[rkllm] tokenizer" in refused.value.message
            assert client.generate("Hi").wait().text == "echo: Hi"  # still serving
    finally:
        with_tokenizer.cleanup()
        without.cleanup()


def test_the_board_bench_times_daemon_sampled_tokens_against_runtime_sampled(fake_runtime, tokenizer_file, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    model = write_model(tmp_path / "tiny.rkllm", f"a fake .rkllm model vocab_size={VOCAB}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_RKLLM_DECODE_US": "200"}
    env.pop("FAKE_RKLLM_LOG", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "npu_board.py"), "--library", str(fake_runtime["1.3"]), "--model", str(model),
         "--tokenizer", str(tokenizer_file), "--runs", "2", "--max-tokens", "12", "--system-tokens", "250", "--conversation-tokens", "250",
         "--workdir", str(tmp_path / "bench"), "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "### Tokens the daemon samples" in out.stdout
    rows = {row["case"]: row for row in json.loads((tmp_path / "b.json").read_text())["sampling"]}
    assert set(rows) == {"runtime samples (GENERATE)", "daemon samples (GET_LOGITS)", "daemon samples, JSON Schema"}
    assert all(row["ms_per_token"] > 0 for row in rows.values())
    assert rows["daemon samples, JSON Schema"]["mask_ms_per_token"] > 0
    assert rows["daemon samples (GET_LOGITS)"]["mask_ms_per_token"] is None
