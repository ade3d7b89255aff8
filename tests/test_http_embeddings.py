"""Embeddings through rkllmd-http: OpenAI's /v1/embeddings, Ollama's /api/embed and
/api/embeddings, called by the official clients, LangChain's embeddings classes and a
replay of Open WebUI's retrieval, against the real daemon and the real model."""

from __future__ import annotations

import base64
import json
import os
import struct
import urllib.error
import urllib.request

import numpy as np
import ollama
import openai
import pytest

from conftest import ROOT

REFERENCES = json.loads((ROOT / "tests" / "data" / "smollm2-embeddings.json").read_text())["cases"]
NAME = "smollm2-135m-instruct:latest"
MODEL = "smollm2-135m-instruct"
CAT, KITTEN = REFERENCES[0]["text"], REFERENCES[1]["text"]


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def cosine(a, b) -> float:
    return float(unit(a) @ unit(b))


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def openai_client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


# -- OpenAI ------------------------------------------------------------------------------------


def test_openai_embeddings_float_and_base64(openai_client) -> None:
    floats = openai_client.embeddings.create(model=MODEL, input=[CAT, KITTEN])
    assert [d.index for d in floats.data] == [0, 1] and floats.model == MODEL
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == len(REFERENCES[0]["ids"]) + len(REFERENCES[1]["ids"])
    first = np.array(floats.data[0].embedding)
    assert first.shape == (576,) and np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    assert cosine(first, REFERENCES[0]["embedding"]) >= 0.999
    # Asked for base64, the client hands over the text: little-endian float32, as OpenAI's.
    encoded = openai_client.embeddings.create(model=MODEL, input=CAT, encoding_format="base64")
    text = encoded.data[0].embedding
    assert isinstance(text, str)
    assert list(struct.unpack("<576f", base64.b64decode(text))) == pytest.approx(list(first), abs=1e-7)
    # Not asked, the official client asks for base64 itself and decodes it.
    sent = openai_client.with_raw_response.embeddings.create(model=MODEL, input=CAT)
    assert json.loads(sent.http_request.content)["encoding_format"] == "base64"
    assert sent.parse().data[0].embedding == pytest.approx(list(first), abs=1e-7)


def test_openai_token_id_inputs(openai_client) -> None:
    case = REFERENCES[3]
    by_ids = openai_client.embeddings.create(model=MODEL, input=case["ids"])
    by_lists = openai_client.embeddings.create(model=MODEL, input=[case["ids"], REFERENCES[0]["ids"]])
    by_text = openai_client.embeddings.create(model=MODEL, input=case["text"])
    assert by_ids.data[0].embedding == by_text.data[0].embedding == by_lists.data[0].embedding
    assert by_ids.usage.prompt_tokens == len(case["ids"]) and len(by_lists.data) == 2


def test_openai_refusals_have_openais_shape(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as dimensions:
        openai_client.embeddings.create(model=MODEL, input=CAT, dimensions=256)
    assert dimensions.value.body["param"] == "dimensions"
    assert openai_client.embeddings.create(model=MODEL, input=CAT, dimensions=576).data[0].embedding
    for bad, param in (([], "input"), ("", "input"), ([1.5], "input"), ([CAT, 3], "input")):
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client.embeddings.create(model=MODEL, input=bad)
        assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as encoding:
        openai_client.post("/embeddings", body={"model": MODEL, "input": CAT, "encoding_format": "int8"}, cast_to=object)
    assert encoding.value.body["param"] == "encoding_format"


# -- Ollama ------------------------------------------------------------------------------------


def test_ollama_embed_and_embeddings(gateway) -> None:
    client = ollama.Client(host=gateway.url, timeout=300)
    batch = client.embed(model=NAME, input=[CAT, KITTEN])
    assert len(batch.embeddings) == 2 and batch.prompt_eval_count == len(REFERENCES[0]["ids"]) + len(REFERENCES[1]["ids"])
    assert np.linalg.norm(batch.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(batch.embeddings[0], REFERENCES[0]["embedding"]) >= 0.999
    assert batch.total_duration >= batch.load_duration >= 0 and batch.total_duration > 0
    one = client.embed(model=NAME, input=CAT, keep_alive="5m", truncate=True)
    assert one.embeddings[0] == pytest.approx(batch.embeddings[0], abs=1e-7)
    # The older endpoint: the mean as Ollama's runner returns it, not normalised.
    old = client.embeddings(model=NAME, prompt=CAT)
    assert np.linalg.norm(old.embedding) == pytest.approx(np.linalg.norm(REFERENCES[0]["embedding"]), rel=1e-3)
    assert cosine(old.embedding, REFERENCES[0]["embedding"]) >= 0.999
    assert client.embeddings(model=NAME, prompt="").embedding == []  # Ollama's way to load a model
    assert client.embed(model=NAME, input="").embeddings == []


def test_ollama_embed_refusals_in_ollamas_words(gateway) -> None:
    status, body = post(gateway.url + "/api/embed", {"model": NAME, "input": [CAT, 7]})
    assert (status, body) == (400, {"error": "invalid input type"})
    status, body = post(gateway.url + "/api/embed", {"model": "nomic-embed-text", "input": CAT})
    assert (status, body) == (404, {"error": "model 'nomic-embed-text' not found"})
    status, body = post(gateway.url + "/api/embeddings", {"prompt": CAT})
    assert (status, body) == (400, {"error": "model is required"})


def test_ollama_embed_cuts_an_input_to_the_context_unless_told_not_to(make_daemon) -> None:
    """As Ollama: cut to the context by default, refused with ``truncate: false``. On a
    512-token context: the same rule as at 4096, in a tenth of the prefill."""
    from http_gateway import GatewayProcess

    proc = make_daemon(env={"RKLLMD_MODEL_CONTEXT_LENGTH": "512"})
    gateway = GatewayProcess(proc.socket).start()
    try:
        long = REFERENCES[5]["text"] * 6
        status, body = post(gateway.url + "/api/embed", {"model": NAME, "input": long, "truncate": False})
        assert (status, body) == (400, {"error": "input length exceeds maximum context length"})
        status, body = post(gateway.url + "/api/embed", {"model": NAME, "input": [long, CAT]})
        assert status == 200 and body["prompt_eval_count"] == 512 + len(REFERENCES[0]["ids"])
        assert cosine(body["embeddings"][1], REFERENCES[0]["embedding"]) >= 0.999
    finally:
        gateway.cleanup()


# -- LangChain ---------------------------------------------------------------------------------


def test_langchain_openai_embeddings(gateway) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send the texts, not tiktoken's ids of OpenAI's tokenizer
    # (what a user of any server other than OpenAI's sets).
    embeddings = OpenAIEmbeddings(base_url=gateway.url + "/v1", api_key="unused", model=MODEL, check_embedding_ctx_length=False, max_retries=0)
    documents = embeddings.embed_documents([CAT, KITTEN, REFERENCES[2]["text"]])
    query = embeddings.embed_query(CAT)
    assert len(documents) == 3 and len(query) == 576
    assert cosine(query, documents[0]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(documents[0], REFERENCES[0]["embedding"]) >= 0.999


def test_langchain_ollama_embeddings(gateway) -> None:
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(base_url=gateway.url, model=NAME)
    documents = embeddings.embed_documents([CAT, KITTEN])
    query = embeddings.embed_query(CAT)
    assert query == pytest.approx(documents[0], abs=1e-7)
    assert cosine(documents[1], REFERENCES[1]["embedding"]) >= 0.999


def test_litellm_embeddings_through_both_providers(gateway) -> None:
    """LiteLLM's ``ollama/`` provider posts /api/embed, its ``openai/`` one /v1/embeddings:
    both get the model's vectors, equal to each other and to llama.cpp's."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of LiteLLM's price list
    import litellm

    through_ollama = litellm.embedding(model=f"ollama/{MODEL}", api_base=gateway.url, input=[CAT, KITTEN])
    through_openai = litellm.embedding(model=f"openai/{MODEL}", api_base=gateway.url + "/v1", api_key="unused", input=[CAT, KITTEN])
    for reply in (through_ollama, through_openai):
        vectors = [item["embedding"] for item in reply.data]
        assert len(vectors) == 2 and cosine(vectors[0], REFERENCES[0]["embedding"]) >= 0.999 and cosine(vectors[1], REFERENCES[1]["embedding"]) >= 0.999
    assert through_ollama.data[1]["embedding"] == pytest.approx(through_openai.data[1]["embedding"], abs=1e-6)
    assert through_openai.usage.prompt_tokens == len(REFERENCES[0]["ids"]) + len(REFERENCES[1]["ids"])
    with pytest.raises(Exception) as missing:  # LiteLLM wraps the 404 in a class of its own per provider
        litellm.embedding(model="ollama/nomic-embed-text", api_base=gateway.url, input=[CAT])
    assert "not found" in str(missing.value)


# -- Open WebUI's retrieval --------------------------------------------------------------------

DOCUMENTS = {
    "sourdough.md": [
        "To bake sourdough bread, feed the starter the night before, mix flour, water and salt, "
        "and let the dough rise slowly before baking it in a very hot oven.",
        "A sourdough loaf needs a long cold proof; score the dough before baking so the crust opens.",
    ],
    "bike-repair.md": [
        "To fix a flat bicycle tyre, remove the wheel, lever the tyre off the rim, find the puncture "
        "in the inner tube and patch it.",
        "Check the tyre pressure after patching the inner tube and before you ride the bicycle again.",
    ],
    "tax-return.md": [
        "Your annual tax return must list your income, deductions and any tax already withheld by your employer.",
        "File the tax return before the deadline to avoid a penalty from the tax office.",
    ],
}


def test_open_webui_retrieval_finds_the_documents_chunk(gateway) -> None:
    """Open WebUI with RAG_EMBEDDING_ENGINE=ollama, replayed as it sends its requests
    (open-webui/open-webui, backend/open_webui/retrieval/utils.py: get_embedding_function ->
    generate_embeddings -> generate_ollama_batch_embeddings): adding a document POSTs its
    chunks in batches to {url}/api/embed as {"input": texts, "model": model, "truncate": true}
    with "Authorization: Bearer {key}" and reads data["embeddings"]; a chat's query goes the
    same way (query_collection: embedding_function(queries)), a list of the queries, and the
    vector store ranks the chunks by cosine similarity."""
    url, headers = gateway.url, {"Authorization": "Bearer "}  # RAG_OLLAMA_API_KEY unset
    chunks = [(name, chunk) for name, parts in DOCUMENTS.items() for chunk in parts]
    stored = []
    for start in range(0, len(chunks), 4):  # RAG_EMBEDDING_BATCH_SIZE
        batch = [chunk for _, chunk in chunks[start:start + 4]]
        status, body = post(url + "/api/embed", {"input": batch, "model": NAME, "truncate": True}, headers)
        assert status == 200 and len(body["embeddings"]) == len(batch)
        stored += body["embeddings"]
    queries = {"How do I patch a punctured bicycle tyre?": "bike-repair.md", "When is my tax return due?": "tax-return.md",
               "How long should sourdough dough rise before baking?": "sourdough.md"}
    status, body = post(url + "/api/embed", {"input": list(queries), "model": NAME, "truncate": True}, headers)
    assert status == 200
    for query_vector, expected in zip(body["embeddings"], queries.values()):
        scores = [cosine(query_vector, v) for v in stored]
        assert chunks[int(np.argmax(scores))][0] == expected, (expected, scores)


def test_metrics_count_embeddings(gateway) -> None:
    post(gateway.url + "/api/embed", {"model": NAME, "input": [CAT]})
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'rkllmd_http_embeddings_total{api="ollama"}' in text and "rkllmd_http_embedding_tokens_total" in text


def test_an_embedding_only_model_over_http(make_daemon) -> None:
    """Ollama lists only "embedding" for an embedding model and refuses chat and generate
    in its words (server/routes.go: "%q does not support chat"); OpenAI's chat is a 400."""
    from http_gateway import GatewayProcess

    proc = make_daemon(env={"RKLLMD_MODEL_EMBEDDING_ONLY": "true"})
    gateway = GatewayProcess(proc.socket).start()
    try:
        client = ollama.Client(host=gateway.url, timeout=300)
        assert client.show(NAME).capabilities == ["embedding"]
        with pytest.raises(ollama.ResponseError) as chat:
            client.chat(model=NAME, messages=[{"role": "user", "content": "hi"}])
        assert chat.value.status_code == 400 and chat.value.error == f'"{NAME}" does not support chat'
        with pytest.raises(ollama.ResponseError) as generate:
            client.generate(model=NAME, prompt="hi")
        assert generate.value.error == f'"{NAME}" does not support generate'
        assert len(client.embed(model=NAME, input=CAT).embeddings[0]) == 576
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as oai:
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert "does not support generate" in refused.value.message
    finally:
        gateway.cleanup()
