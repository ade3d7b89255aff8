"""Embeddings through the real daemon, the real client and the real model (the ``embed``
operation, protocol 1.7), compared with llama.cpp's mean pooling on the same float32
weights (tests/data/smollm2-embeddings.json, made by tools/make_embedding_references.py)."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

from conftest import ROOT, DaemonProcess, rkllmctl
from rkllmctl import DaemonError

REFERENCES = json.loads((ROOT / "tests" / "data" / "smollm2-embeddings.json").read_text())
CASES = REFERENCES["cases"]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c['ids'])} tokens")
def test_embedding_equals_llama_cpp_mean_pooling(daemon: DaemonProcess, case: dict) -> None:
    with daemon.client() as client:
        raw = client.embed(case["text"], normalize=False)
        normalized = client.embed(case["text"])
    assert raw["prompt_tokens"] == [len(case["ids"])] == normalized["prompt_tokens"]
    assert raw["dimensions"] == len(case["embedding"]) == 576
    assert cosine(raw["embeddings"][0], case["embedding"]) >= 0.999
    # Not normalised: llama.cpp's mean as it is, magnitude and all.
    assert np.linalg.norm(raw["embeddings"][0]) == pytest.approx(np.linalg.norm(case["embedding"]), rel=1e-3)
    assert np.linalg.norm(normalized["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(normalized["embeddings"][0], unit(case["embedding"]), atol=2e-4)


def test_token_id_input_equals_its_text(daemon: DaemonProcess) -> None:
    case = CASES[3]  # non-ASCII: the ids are llama.cpp's own tokenization
    with daemon.client() as client:
        by_text = client.embed(case["text"])
        by_ids = client.embed(case["ids"])
        listed = client.embed([case["ids"], CASES[0]["ids"]])
    assert by_ids["prompt_tokens"] == [len(case["ids"])]
    assert by_ids["embeddings"][0] == by_text["embeddings"][0]
    assert listed["embeddings"][0] == by_text["embeddings"][0]
    assert listed["prompt_tokens"] == [len(case["ids"]), len(CASES[0]["ids"])]


def test_a_batch_equals_one_by_one(daemon: DaemonProcess) -> None:
    texts = [c["text"] for c in CASES]
    with daemon.client() as client:
        batch = client.embed(texts)
        alone = [client.embed(text) for text in texts]
    assert batch["prompt_tokens"] == [a["prompt_tokens"][0] for a in alone]
    assert batch["total_tokens"] == sum(batch["prompt_tokens"])
    for together, single in zip(batch["embeddings"], alone):
        assert np.max(np.abs(np.subtract(together, single["embeddings"][0]))) <= 1e-6


def test_similar_sentences_are_nearer_than_unrelated_ones(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        cat, kitten, revenue = client.embed([CASES[0]["text"], CASES[1]["text"], CASES[2]["text"]])["embeddings"]
    assert cosine(cat, kitten) > cosine(cat, revenue)


def test_embeddings_travel_as_little_endian_float32_bins(daemon: DaemonProcess) -> None:
    """The wire form as docs/protocol.md gives it, read without the client's help."""
    with daemon.client() as client:
        request_id = client.send("embed", input=["one", "two"])
        message = client.receive(request_id, 60)
    result = message["result"]
    assert message["type"] == "result" and set(result) == {"embeddings", "dimensions", "normalized", "prompt_tokens", "total_tokens", "queue_ms", "compute_ms"}
    assert all(isinstance(b, bytes) and len(b) == 4 * result["dimensions"] for b in result["embeddings"])
    vector = struct.unpack(f"<{result['dimensions']}f", result["embeddings"][0])
    assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-5)
    assert result["normalized"] is True and result["compute_ms"] > 0


def test_truncation_and_overflow(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_MODEL_CONTEXT_LENGTH": "64"})
    long_text = CASES[5]["text"]  # 764 tokens
    with proc.client() as client:
        cut = client.embed(long_text)
        first_64 = client.embed(CASES[5]["ids"][:64])
        with pytest.raises(DaemonError) as refused:
            client.embed([CASES[0]["text"], long_text], truncate=False)
        fits = client.embed(CASES[0]["text"], truncate=False)
        with pytest.raises(DaemonError) as ids_refused:
            client.embed(CASES[5]["ids"][:65], truncate=False)
    assert cut["prompt_tokens"] == [64]
    assert cut["embeddings"] == first_64["embeddings"]  # its first tokens are kept
    assert refused.value.name == "context_overflow"
    assert refused.value.details["prompt_tokens"] == 764 and refused.value.details["context_length"] == 64
    assert ids_refused.value.name == "context_overflow"
    assert fits["prompt_tokens"] == [7]


@pytest.mark.parametrize(
    "value, where",
    [
        ([], "input"),
        ("", "input[0] is empty"),
        ([""], "input[0] is empty"),
        (["fine", 3.5], "input[1]"),
        ([["a"]], "input[0]"),
        ([[]], "input[0]"),
        ({"text": "x"}, "input"),
        ([-1], "input"),
        (True, "input"),
        (["x"] * 2049, "input"),
    ],
    ids=["empty list", "empty text", "empty text in a list", "a number", "a list of strings in a list", "empty ids", "a map",
         "a negative id", "a bool", "too many"],
)
def test_bad_input_is_a_structured_error_and_the_daemon_keeps_serving(daemon: DaemonProcess, value, where: str) -> None:
    with daemon.client() as client:
        with pytest.raises(DaemonError) as refused:
            client.call("embed", input=value)
        assert client.embed("still here")["prompt_tokens"] == [2]
    assert refused.value.name == "invalid_field" and refused.value.details["field"] == "input"
    assert where in refused.value.message


def test_other_refusals(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        with pytest.raises(DaemonError) as vocabulary:
            client.embed([[1, 2, 49152]])
        with pytest.raises(DaemonError) as missing:
            client.call("embed")
        with pytest.raises(DaemonError) as other_model:
            client.embed("x", model="llama3:8b")
        named = client.embed("x", model="smollm2-135m-instruct:latest")
        with pytest.raises(DaemonError) as nul:
            client.embed("a\x00b")
    assert vocabulary.value.name == "invalid_field" and "vocabulary" in vocabulary.value.message
    assert missing.value.name == "invalid_field" and missing.value.details["field"] == "input"
    assert other_model.value.name == "not_found"
    assert named["prompt_tokens"] == [1]
    assert nul.value.name == "invalid_field"


def test_status_lists_the_embedding_capability(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        status = client.status()
    assert status["protocol"] >= [1, 7]
    assert status["model"]["capabilities"][0] == "completion" and "embedding" in status["model"]["capabilities"]


def test_embeddings_leave_running_generations_unchanged(make_daemon) -> None:
    """Greedy generations give the same text whether embeddings run beside them or not."""
    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "4"})
    prompts = ["Name three colours.", "What is the capital of France?"]
    with proc.client() as client:
        alone = [client.generate(p, max_tokens=40, temperature=0, no_cache=True).wait().text for p in prompts]
    texts = [c["text"] for c in CASES]  # ~1,900 tokens: prefill chunks beside every decode step
    embedded: list[dict] = []

    def embed_meanwhile() -> None:
        with proc.client() as client:
            for _ in range(2):
                embedded.append(client.embed(texts))

    with proc.client() as client:
        streams = [client.generate(p, max_tokens=40, temperature=0, no_cache=True) for p in prompts]
        worker = threading.Thread(target=embed_meanwhile)
        worker.start()
        beside = [s.wait().text for s in streams]
        worker.join(300)
        reference = client.embed(texts)
    assert beside == alone
    assert len(embedded) == 2 and all(e["embeddings"] == reference["embeddings"] for e in embedded)


def test_an_embedding_only_model_refuses_generation(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_MODEL_EMBEDDING_ONLY": "true"})
    with proc.client() as client:
        assert client.status()["model"]["capabilities"] == ["embedding"]
        for fields in ({"prompt": "hi"}, {"prompt": "hi", "raw": True}):
            with pytest.raises(DaemonError) as refused:
                client.generate(**fields).wait()
            assert refused.value.name == "invalid_field" and refused.value.details["capability"] == "completion"
            assert "does not support generate" in refused.value.message
        assert client.embed("still embeds")["dimensions"] == 576


def test_rkllmctl_embed(daemon: DaemonProcess) -> None:
    done = rkllmctl("embed", "--json", CASES[0]["text"], CASES[1]["text"], socket=daemon.socket)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["prompt_tokens"] == [7, 8] and len(answer["embeddings"]) == 2
    assert cosine(answer["embeddings"][0], CASES[0]["embedding"]) >= 0.999
    raw = rkllmctl("embed", "--json", "--no-normalize", CASES[0]["text"], socket=daemon.socket)
    assert np.linalg.norm(json.loads(raw.stdout)["embeddings"][0]) == pytest.approx(np.linalg.norm(CASES[0]["embedding"]), rel=1e-3)
    plain = rkllmctl("embed", CASES[0]["text"], socket=daemon.socket)
    assert plain.returncode == 0 and "576" in plain.stdout and "7 tokens" in plain.stdout
    refused = rkllmctl("embed", "--no-truncate", "", socket=daemon.socket)
    assert refused.returncode != 0 and "empty" in refused.stderr


def test_msgpack_request_shape_is_accepted_as_documented(daemon: DaemonProcess) -> None:
    """A flat list of ints is one input of token ids (not a list of inputs)."""
    with daemon.client() as client:
        flat = client.embed([1, 2, 3])
    assert flat["prompt_tokens"] == [3] and len(flat["embeddings"]) == 1
