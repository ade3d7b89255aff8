"""Embeddings on the NPU: the runtime's GET_LAST_HIDDEN_LAYER infer mode, pooled and
normalised by the daemon, on the fake runtime of each interface generation.

The fake (tests/fake_rkllm/fake_rkllm.c, "Hidden-layer mode") hands a row per input token,
each the pseudo-values of the bytes seen up to that token (FNV-1a 64, then splitmix64 per
component), and overwrites the buffer once its callback returns, as the runtime frees it.
So this test computes independently what the mean over the input's rows must be.
"""

from __future__ import annotations

import numpy as np
import pytest

from rkllmctl import DaemonError
from test_rkllm_daemon import NpuDaemon

EMBD = 48
MASK64 = (1 << 64) - 1
MODEL_TEXT = f"a fake .rkllm model embd_size={EMBD}\n"


def pseudo_row(seen: bytes) -> np.ndarray:
    """The fake's row for what it has seen (its pseudo_logits with embd_size components)."""
    h = 14695981039346656037
    for byte in seen:
        h = ((h ^ byte) * 1099511628211) & MASK64
    with np.errstate(over="ignore"):
        x = np.uint64(h) + np.arange(EMBD, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(40)).astype(np.float32) / np.float32(1048576) - np.float32(8)


def expected(pieces: list[bytes], normalize: bool = True) -> np.ndarray:
    """The mean of the rows for an input whose tokens are ``pieces`` (from an empty cache)."""
    rows = [pseudo_row(b"".join(pieces[: t + 1])) for t in range(len(pieces))]
    mean = np.mean(np.array(rows, np.float64), axis=0)
    return mean / np.linalg.norm(mean) if normalize else mean


def text_tokens(text: str) -> list[bytes]:
    """The fake's prompt tokens: its bytes (the daemon sets an empty chat template)."""
    return [bytes([b]) for b in text.encode()]


@pytest.fixture(params=["1.2", "1.3"])
def npu(request, fake_runtime):
    proc = NpuDaemon(fake_runtime[request.param], model_text=MODEL_TEXT).start()
    yield proc
    proc.cleanup()


def test_the_mean_of_the_runtimes_last_hidden_layer(npu: NpuDaemon) -> None:
    with npu.client() as client:
        assert "embedding" in client.status()["model"]["capabilities"]
        mark = npu.calls.mark()
        one = client.embed("héllo")
        raw = client.embed("héllo", normalize=False)
        by_ids = client.embed([[5, 7, 11]])
        batch = client.embed(["héllo", "world", [5, 7, 11]])
        runs = [c for c in npu.calls.since(mark) if c.name == "rkllm_run"]
        assert client.status()["model"]["embedding_length"] == EMBD
    assert one["prompt_tokens"] == [6] and one["dimensions"] == EMBD
    assert np.allclose(one["embeddings"][0], expected(text_tokens("héllo")), atol=1e-6)
    assert np.allclose(raw["embeddings"][0], expected(text_tokens("héllo"), normalize=False), atol=1e-5)
    assert np.allclose(by_ids["embeddings"][0], expected([b"<[5]>", b"<[7]>", b"<[11]>"]), atol=1e-6)
    assert batch["embeddings"] == [one["embeddings"][0], client_embed_world(npu), by_ids["embeddings"][0]]
    assert batch["prompt_tokens"] == [6, 5, 3] and batch["total_tokens"] == 14
    # Each input its own run, in the hidden-layer mode, without history.
    assert len(runs) == 6 and all(r.args["mode"] == "1" and r.args["keep_history"] == "0" and r.args["kv_before"] == "0" for r in runs)


def client_embed_world(npu: NpuDaemon) -> list[float]:
    with npu.client() as client:
        vector = client.embed("world")["embeddings"][0]
    assert np.allclose(vector, expected(text_tokens("world")), atol=1e-6)
    return vector


def test_embeddings_between_turns_of_a_conversation(npu: NpuDaemon) -> None:
    """An embedding clears the runtime's history (and the prompt cache it would match), so
    it never sees a conversation's tokens, and the conversation's next turn is sent whole."""
    chat = [{"role": "user", "content": "remember the word apricot"}]
    with npu.client() as client:
        first = client.generate(messages=chat, max_tokens=20).wait()
        before = client.embed("apricot")
        chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "[[fake:recall]] which word?"}]
        second = client.generate(messages=chat, max_tokens=30).wait()
        after = client.embed("apricot")
        with npu.client() as other:
            again = other.generate(messages=chat, max_tokens=30, no_cache=True).wait()
    assert before["embeddings"] == after["embeddings"]
    assert np.allclose(before["embeddings"][0], expected(text_tokens("apricot")), atol=1e-6)
    assert second.text == again.text and "apricot" in second.text


@pytest.mark.parametrize("interface", ["1.2", "1.3"])
def test_truncation_and_overflow_without_a_tokenizer(fake_runtime, interface: str) -> None:
    """Without [rkllm] tokenizer a text's tokens are bounded by its UTF-8 bytes + 2: a text
    over the context is cut to fit (the fake, like the runtime, crashes on a longer input)."""
    long = "abcdefghij" * 10
    npu = NpuDaemon(fake_runtime[interface], model_text=MODEL_TEXT, env={"RKLLMD_MODEL_CONTEXT_LENGTH": "64"}).start()
    try:
        _truncation(npu, long)
    finally:
        npu.cleanup()


def _truncation(npu: NpuDaemon, long: str) -> None:
    with npu.client() as client:
        cut = client.embed(long)
        with pytest.raises(DaemonError) as refused:
            client.embed(long, truncate=False)
        assert client.embed("still serving")["prompt_tokens"] == [13]
    assert cut["prompt_tokens"] == [62]
    assert np.allclose(cut["embeddings"][0], expected(text_tokens(long[:62])), atol=1e-6)
    assert refused.value.name == "context_overflow" and refused.value.details["context_length"] == 64
