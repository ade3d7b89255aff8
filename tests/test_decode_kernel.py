"""The C forward pass (forward.c through ctypes) against the numpy reference step, on
SmolLM2 and on small models with awkward shapes; how it is built, kept, refused and
replaced; and the daemon without a compiler."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rkllmd.backends.cpu import kernels
from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.cpu.model import KVSlot, Model, from_panels, to_panels

from conftest import ROOT, reference_cases, rkllmctl
from gguf_files import tiny_llama

SHARED_KERNELS = Path(os.environ["RKLLMD_MODEL_KERNELS_DIR"])
SHARED_WEIGHTS = Path(os.environ["RKLLMD_MODEL_WEIGHTS_DIR"])


def teacher_forced(model: Model, slot: KVSlot, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each of ``tokens`` fed in turn."""
    out = [model.prefill(slot, prompt, 0)]
    for i, token in enumerate(tokens):
        out.append(model.decode(slot, token, len(prompt) + i))
    return out


def assert_same_step(c_model: Model, numpy_model: Model, prompt: list[int], steps: int) -> None:
    """Both steps, fed the numpy model's greedy tokens, give the same logits (to float32
    rounding), the same greedy choices and the same KV cache."""
    rng = np.random.default_rng(len(prompt))
    tokens = [int(t) for t in rng.integers(0, numpy_model.config.vocab_size, steps)]
    c_slot, numpy_slot = c_model.new_slot(), numpy_model.new_slot()
    reference = teacher_forced(numpy_model, numpy_slot, prompt, tokens)
    ours = teacher_forced(c_model, c_slot, prompt, tokens)
    for step, (a, b) in enumerate(zip(ours, reference)):
        scale = float(np.abs(b).max())
        assert np.abs(a - b).max() <= 1e-4 * scale + 1e-5, f"step {step}"
        assert int(np.argmax(a)) == int(np.argmax(b)), f"step {step}"
    n = len(prompt) + steps
    for ours, reference in zip(c_slot.read(0, n), numpy_slot.read(0, n)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * float(np.abs(reference).max()))


@pytest.fixture(scope="module")
def smollm2_pair():
    made = {}
    for mode in ("c", "numpy"):
        backend = CpuBackend(context_length=1024, weights_dir=SHARED_WEIGHTS, kernels_mode=mode, kernels_dir=SHARED_KERNELS)
        backend.load()
        made[mode] = backend
    return made["c"], made["numpy"]


def test_smollm2_c_step_matches_the_numpy_reference(smollm2_pair):
    c_backend, numpy_backend = smollm2_pair
    assert c_backend.describe()["decode"].startswith("C, ")
    assert numpy_backend.describe()["decode"] == "numpy (model.kernels = numpy)" + kernels.NUMPY_EXACTNESS
    prompt = c_backend.tokenizer.encode(c_backend.render([{"role": "user", "content": "Name three rivers of Europe."}]))
    assert_same_step(c_backend.model, numpy_backend.model, prompt, steps=24)


def test_smollm2_c_step_gives_the_llama_cpp_reference_completions(smollm2_pair):
    c_backend, _ = smollm2_pair
    for case in reference_cases()[:3]:
        ids = c_backend.tokenizer.encode(c_backend.render(case["messages"]))
        model, out = c_backend.model, []
        slot = model.new_slot()
        logits = model.prefill(slot, ids, 0)
        while len(out) < case["max_tokens"] and int(np.argmax(logits)) not in c_backend.tokenizer.end_of_generation_ids:
            out.append(int(np.argmax(logits)))
            logits = model.decode(slot, out[-1], len(ids) + len(out) - 1)
        assert c_backend.tokenizer.decode(out) == case["completion"]


def test_panels_hold_each_output_where_forward_c_reads_it():
    """forward.c reads output o's weight for input k at ((o // 16) * K + k) * 16 + o % 16,
    the last panel zero-padded; numpy's copy unpacks them back."""
    matrix = np.random.default_rng(3).standard_normal((2, 37, 5)).astype(np.float32)  # 37 outputs: 3 panels
    panels = to_panels(matrix)
    assert panels.shape == (2, 3, 5, kernels.PANEL)
    flat = panels.reshape(2, -1)
    for o, k in ((0, 0), (15, 4), (16, 0), (36, 3)):
        assert flat[1, ((o // 16) * 5 + k) * 16 + o % 16] == matrix[1, o, k]
    assert not panels[:, 2, :, 5:].any()
    assert np.array_equal(from_panels(panels, 37), matrix)


@pytest.mark.parametrize(
    "dim,heads,kv_heads,layers",
    [
        (36, 6, 2, 2),  # head_dim 6, dim and ffn (72) not multiples of the 16 lanes
        (36, 6, 6, 1),  # one query head per KV head
        (36, 6, 1, 2),  # all query heads on one KV head
        (128, 2, 1, 1),  # head_dim 64 as SmolLM2, rows longer than 4 x 16 lanes
    ],
)
def test_awkward_shapes_match_the_reference(tmp_path, dim, heads, kv_heads, layers):
    gguf = GGUFFile(tiny_llama(tmp_path / "tiny.gguf", dim=dim, heads=heads, kv_heads=kv_heads, layers=layers))
    kernel = kernels.c_kernel(SHARED_KERNELS)
    c_model = Model.from_gguf(gguf, context_length=70, prefill_chunk=16, kernel=kernel)
    numpy_model = Model.from_gguf(gguf, context_length=70, prefill_chunk=16)
    # Decode runs up to the last position of the context.
    assert_same_step(c_model, numpy_model, [5, 17, 3, 99, 42], steps=65)


def test_long_contexts_span_several_attention_chunks(tmp_path):
    """forward.c splits attention into chunks of 256 positions and merges them: contexts of
    one, two and three chunks, the boundaries included, give the reference's results."""
    gguf = GGUFFile(tiny_llama(tmp_path / "tiny.gguf", dim=36, heads=6, kv_heads=2, layers=2))
    c_model = Model.from_gguf(gguf, context_length=560, prefill_chunk=64, kernel=kernels.c_kernel(SHARED_KERNELS))
    numpy_model = Model.from_gguf(gguf, context_length=560, prefill_chunk=64)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, c_model.config.vocab_size, 250)]
    assert_same_step(c_model, numpy_model, prompt, steps=300)  # positions 250 to 549


def test_decode_refuses_tokens_outside_the_vocabulary(tmp_path):
    gguf = GGUFFile(tiny_llama(tmp_path / "tiny.gguf"))
    model = Model.from_gguf(gguf, context_length=16, kernel=kernels.c_kernel(SHARED_KERNELS))
    slot = model.new_slot()
    model.prefill(slot, [1, 2], 0)
    for token in (-1, model.config.vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.decode(slot, token, 2)
    with pytest.raises(ValueError, match="cannot run 1 tokens at position 16"):
        model.decode(slot, 1, 16)


def test_binding_refuses_arrays_the_step_would_overrun(tmp_path):
    model = Model.from_gguf(GGUFFile(tiny_llama(tmp_path / "tiny.gguf")), context_length=16)
    kernel, arrays = kernels.c_kernel(SHARED_KERNELS), model._kernel_arrays()
    bound = kernel.bind(model.config, model.context_length, arrays)
    for cache in (np.empty(3, np.float32), model.new_slot().keys.astype(np.float64), model.new_slot().values[..., ::-1]):
        with pytest.raises(kernels.KernelError, match="a KV cache must be a C-contiguous float32 array of"):
            bound.cache_address(cache)
    with pytest.raises(kernels.KernelError, match="wo is not"):
        kernel.bind(model.config, model.context_length, {**arrays, "wo": arrays["wo"][..., ::-1]})
    with pytest.raises(kernels.KernelError, match="rope_cos is not"):
        kernel.bind(model.config, model.context_length, {**arrays, "rope_cos": arrays["rope_cos"].astype(np.float64)})
    with pytest.raises(kernels.KernelError, match="needs exactly"):
        kernel.bind(model.config, model.context_length, {name: array for name, array in arrays.items() if name != "rope_sin"})


THREADS_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from rkllmd.backends.cpu import kernels
    from rkllmd.backends.cpu.gguf import GGUFFile
    from rkllmd.backends.cpu.model import Model, from_panels, to_panels
    model = Model.from_gguf(GGUFFile(Path(sys.argv[1])), context_length=64, kernel=kernels.c_kernel(Path(sys.argv[2])))
    slot = model.new_slot()
    model.prefill(slot, [5, 6, 7], 0)
    print(kernels.c_kernel(Path(sys.argv[2])).detail.split(" (")[0])
    for i, token in enumerate([9, 30, 200, 4, 77]):
        sys.stdout.write(model.decode(slot, token, 3 + i).tobytes().hex())
    """
)


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    model = tiny_llama(tmp_path / "tiny.gguf", dim=96, heads=4, kv_heads=2, layers=2)
    outputs = {}
    for threads in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", THREADS_PROBE, str(model), str(SHARED_KERNELS)],
            capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads},
        )
        detail, logits = done.stdout.split("\n", 1)
        assert detail == f"C, {threads} thread{'s' * (threads != '1')}"
        outputs[threads] = logits
    assert outputs["1"] == outputs["2"] == outputs["3"]


# -- building, keeping, refusing -------------------------------------------------------


def built(folder: Path) -> list[Path]:
    return sorted(folder.glob("forward.*.so"))


def test_built_once_then_loaded(tmp_path, caplog):
    caplog.set_level("INFO")
    first = kernels.c_kernel(tmp_path)
    [library] = built(tmp_path)
    assert first.detail.endswith(f"({library})")
    assert oct(library.stat().st_mode & 0o777) == "0o640"
    assert "compiled the forward kernel" in caplog.text
    caplog.clear()
    inode = library.stat().st_ino
    kernels.c_kernel(tmp_path)
    assert library.stat().st_ino == inode and "compiled" not in caplog.text


def load_in_a_new_process(folder: Path) -> subprocess.CompletedProcess:
    """``c_kernel(folder)`` in a fresh interpreter: dlopen hands a process the library it
    already loaded from a path, whatever the file there is now."""
    code = f"from pathlib import Path; from rkllmd.backends.cpu import kernels; print(kernels.c_kernel(Path({str(folder)!r})).detail)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)


@pytest.mark.parametrize("damage", ["corrupt", "group-writable", "older version"])
def test_unusable_library_is_rebuilt(tmp_path, damage):
    kernels.c_kernel(tmp_path)
    [library] = built(tmp_path)
    if damage == "corrupt":  # by rename: rewriting it in place would pull it from under this process
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"\x7fELF" + b"\0" * 60)
        garbage.chmod(0o640)
        garbage.replace(library)
    elif damage == "group-writable":
        library.chmod(0o660)
    else:  # a build of another source or compiler: removed once the current one is built
        library.rename(tmp_path / "forward.0123456789abcdef.so")
    done = load_in_a_new_process(tmp_path)
    assert done.stdout.startswith("C, ")
    [rebuilt] = built(tmp_path)
    assert rebuilt == library and oct(rebuilt.stat().st_mode & 0o777) == "0o640"
    if damage == "corrupt":
        assert "rebuilding the forward kernel: cannot load" in done.stderr
    elif damage == "group-writable":
        assert "rebuilding the forward kernel" in done.stderr and "that only we can write" in done.stderr


def test_unusable_folder_builds_for_the_process(tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    kernel = kernels.c_kernel(blocker / "kernels")
    assert kernel.detail.endswith("(built for this process)")
    assert "cannot keep the forward kernel" in caplog.text


def test_library_of_another_abi_is_refused(tmp_path):
    source = tmp_path / "other.c"
    source.write_text("int rkllmd_kernel_abi(void) { return 999; }\n")
    library = tmp_path / "other.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    with pytest.raises(kernels.KernelError, match="kernel ABI 999"):
        kernels._load_library(library)


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """No C compiler anywhere: CC names nothing and PATH holds only python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CC", "no-such-compiler")
    return {"PATH": str(bin_dir), "CC": "no-such-compiler"}


def test_without_a_compiler_auto_falls_back_and_c_refuses(tmp_path, no_compiler):
    kernel, detail = kernels.load_kernel("auto", tmp_path / "fresh")
    assert kernel is None
    assert detail == "numpy (no C kernel: no C compiler found (set CC, or install gcc))" + kernels.NUMPY_EXACTNESS
    with pytest.raises(kernels.KernelError, match="no C compiler found"):
        kernels.load_kernel("c", tmp_path / "fresh")


def test_failing_compiler_is_reported(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'cc1: out of memory' >&2\nexit 4\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    kernel, detail = kernels.load_kernel("auto", tmp_path / "kernels")
    assert kernel is None
    assert "failed (exit 4): cc1: out of memory" in detail
    assert built(tmp_path / "kernels") == [] and [p.name for p in (tmp_path / "kernels").iterdir()] == [".lock"]


def test_daemon_without_a_compiler_serves_in_numpy_and_says_so(make_daemon, tmp_path, no_compiler):
    env = {**no_compiler, "RKLLMD_MODEL_KERNELS_DIR": str(tmp_path / "kernels")}
    daemon = make_daemon(env=env)
    case = reference_cases()[0]
    with daemon.client() as client:
        assert client.status()["model"]["decode"].startswith("numpy (no C kernel: no C compiler found")
        result = client.generate(messages=case["messages"], max_tokens=case["max_tokens"], temperature=0).wait()
    assert result.text == case["completion"]
    assert "decode:   numpy (no C kernel" in rkllmctl("status", socket=daemon.socket).stdout
    assert "the forward pass runs in numpy, slower" in daemon.log()


def test_daemon_asked_for_c_without_a_compiler_exits_with_the_reason(make_daemon, tmp_path, no_compiler):
    env = {**no_compiler, "RKLLMD_MODEL_KERNELS": "c", "RKLLMD_MODEL_KERNELS_DIR": str(tmp_path / "kernels")}
    daemon = make_daemon(env=env, start=False).start(wait=False)
    assert daemon.wait(60) == 1
    assert "model.kernels = c: no C compiler found" in daemon.log()
    assert not daemon.socket.exists()


def test_daemon_status_names_the_c_step(daemon):
    status = rkllmctl("status", socket=daemon.socket).stdout
    line = next(line for line in status.splitlines() if line.startswith("decode:"))
    assert line.startswith("decode:   C, ") and str(SHARED_KERNELS) in line
    assert stat.S_IMODE(SHARED_KERNELS.stat().st_mode) == 0o750
