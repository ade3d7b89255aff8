"""Dequantized weights kept on disk and read back (into 2 MB pages) or memory-mapped at the
next start: used only when written for this very model file and layout, rebuilt otherwise,
never read half-written."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from rkllmd.backends.cpu import weights_file
from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.sampling import SamplingParams
from rkllmd.store import LOCK_NAME, TEMP_PREFIX

from conftest import SHARED_BUILDS, mappings_kb, reference_cases, rkllmctl
from gguf_files import tiny_llama
from reliability import tmpfs

PROMPTS = ["the thin hen", "<|im_start|>user\nin the inn<|im_end|>\n", "0123 tea"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_llama(tmp_path / "tiny.F32.gguf")


def loaded(model: Path, folder: Path | None, huge_pages: bool = True) -> CpuBackend:
    backend = CpuBackend(model, context_length=64, prefill_chunk=16, weights_dir=folder, weights_huge_pages=huge_pages)
    backend.load()
    return backend


def read_back(kept: Path, huge_pages: bool = True) -> set[str]:
    """What status may say of weights taken from the file ``kept``: in 2 MB pages where this
    kernel has them (and they are asked for), mapped if the kernel maps the file so, else
    read into private memory (a file under 2 MB, as the tiny model's, always); else mapped."""
    if huge_pages and weights_file.huge_pages_available():
        return {f"mapped from {kept} in 2 MB pages", f"read from {kept} into 2 MB pages"}
    return {f"mapped from {kept}"}


def outputs(backend: CpuBackend) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        pieces: list[str] = []
        backend.generate(prompt, SamplingParams(max_tokens=12), None, lambda p: pieces.append(p) or True)
        texts.append("".join(pieces))
    return texts


def kept_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{weights_file.SUFFIX}"))


@pytest.mark.parametrize("huge_pages", [True, False], ids=["read", "mapped"])
def test_second_load_takes_what_the_first_kept_and_computes_the_same(model, tmp_path, huge_pages):
    folder = tmp_path / "weights"
    first = loaded(model, folder, huge_pages)
    assert first.describe()["weights"].startswith("dequantized, kept in")
    [kept] = kept_files(folder)
    assert oct(folder.stat().st_mode & 0o777) == "0o750"

    second = loaded(model, folder, huge_pages)
    assert second.describe()["weights"] in read_back(kept, huge_pages)
    taken = second.model.w.arrays()
    for name, array in first.model.w.arrays().items():
        assert not taken[name].flags.writeable, f"{name} must be read-only"
        assert np.array_equal(taken[name], array), name
    assert outputs(second) == outputs(first) == outputs(loaded(model, None))
    assert all(outputs(first)), "the tiny model generates something"


def test_a_kernel_without_populate_read_faults_the_pages_in_by_reading(model, tmp_path, monkeypatch):
    """Before Linux 5.14 madvise(MADV_POPULATE_READ) is refused (EINVAL): the pages are
    faulted in by reading them, and the load goes on (called with huge pages asked for
    whether or not this kernel has them: the way there is the same)."""
    folder = tmp_path / "weights"
    first = loaded(model, folder)
    [kept] = kept_files(folder)
    monkeypatch.setattr(weights_file, "MADV_POPULATE_READ", 0x7FFF)  # advice no kernel knows: EINVAL
    gguf = GGUFFile(model)
    taken = weights_file.load(folder, gguf, first.model.config, weights_file.weights_key(gguf), huge_pages=True)
    assert taken is not None
    weights, source = taken
    assert source in {f"mapped from {kept} in 2 MB pages", f"read from {kept} into 2 MB pages"}
    for name, array in first.model.w.arrays().items():
        assert np.array_equal(weights.arrays()[name], array), name


def test_kept_weights_of_a_real_model_are_in_huge_pages():
    """SmolLM2's 540 MB: a decode step streams them all, faster in 2 MB pages than in 4 KB
    ones (weights_file's docstring has the timings): mapped so, else read into them."""
    backend = CpuBackend(weights_dir=SHARED_BUILDS / "weights", kernels_dir=SHARED_BUILDS / "kernels")
    backend.load()
    backend.close()  # the kept file exists now (this load may have made it)
    backend.load()
    gguf = GGUFFile(backend.model_path)
    kept = weights_file.path_for(SHARED_BUILDS / "weights", gguf, weights_file.weights_key(gguf))
    gguf.close()
    source = backend.describe()["weights"]
    assert source in read_back(kept)
    if weights_file.huge_pages_available():
        gate_up = backend.model.w.wgu
        field = "FilePmdMapped" if source.startswith("mapped") else "AnonHugePages"
        assert mappings_kb([gate_up.ctypes.data], field) * 1024 >= gate_up.nbytes // 2
    backend.close()


@pytest.mark.parametrize("damage", ["truncate", "extend", "header", "foreign key"])
def test_damaged_file_is_ignored_and_rebuilt(model, tmp_path, damage, caplog):
    folder = tmp_path / "weights"
    reference = outputs(loaded(model, folder))
    [kept] = kept_files(folder)
    size = kept.stat().st_size
    if damage == "truncate":
        os.truncate(kept, size - 4)
    elif damage == "extend":
        os.truncate(kept, size + 4096)
    elif damage == "header":
        with open(kept, "r+b") as f:
            f.write(b"{\"magic\": \"somebody else\"")
    else:  # a file written for another model under this one's name
        other = tiny_llama(tmp_path / "other.gguf", seed=1)
        loaded(other, folder)
        kept.unlink()
        os.rename(kept_files(folder)[0], kept)

    again = loaded(model, folder)
    assert again.describe()["weights"].startswith("dequantized, kept in")
    assert "ignoring" in caplog.text
    assert kept.stat().st_size == size
    assert outputs(again) == reference
    assert loaded(model, folder).describe()["weights"] in read_back(kept)


def rewrite(model: Path, seed: int) -> None:
    """The model file is replaced by another version (a new mtime, whatever the clock's grain)."""
    tiny_llama(model, seed=seed)
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_changed_model_file_replaces_its_old_weights_only(model, tmp_path):
    folder = tmp_path / "weights"
    loaded(model, folder).close()
    neighbour = tiny_llama(tmp_path / "tiny.gguf", seed=2)  # its stem is a prefix of the model's
    loaded(neighbour, folder).close()
    [old] = [p for p in kept_files(folder) if p.name.startswith("tiny.F32.")]

    rewrite(model, seed=3)
    assert loaded(model, folder).describe()["weights"].startswith("dequantized, kept in")
    names = [p.name for p in kept_files(folder)]
    assert old.name not in names and len(names) == 2
    assert any(name.startswith("tiny.F32.") for name in names) and any(name.startswith("tiny.") and "F32" not in name for name in names)


def test_weights_in_use_are_not_replaced_under_their_user(model, tmp_path):
    """A backend still serves the old version (a daemon until its swap, another daemon):
    the new version is written beside it, and the old one waits for the collection."""
    folder = tmp_path / "weights"
    serving = loaded(model, folder)
    [old] = kept_files(folder)
    rewrite(model, seed=3)
    assert loaded(model, folder).describe()["weights"].startswith("dequantized, kept in")
    assert old in kept_files(folder) and len(kept_files(folder)) == 2
    serving.close()


def test_unusable_folder_still_loads(model, tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    backend = loaded(model, blocker / "weights")
    assert backend.describe()["weights"] == "dequantized (not kept: folder unusable)"
    assert "cannot keep dequantized weights" in caplog.text
    assert outputs(backend) == outputs(loaded(model, None))


def test_leftovers_of_a_killed_writer_are_removed(model, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    leftover = folder / f"{TEMP_PREFIX}tiny.F32.0123456789abcdef.weights.x1y2"
    leftover.write_bytes(b"\0" * 1000)
    loaded(model, folder)
    assert not leftover.exists()
    assert len(kept_files(folder)) == 1


def test_loads_racing_for_one_folder_write_once(model, tmp_path):
    folder = tmp_path / "weights"
    sources: list[str] = []
    threads = [threading.Thread(target=lambda: sources.append(loaded(model, folder).describe()["weights"])) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [kept] = kept_files(folder)
    assert sorted(sources)[0] == f"dequantized, kept in {kept}" and set(sorted(sources)[1:]) <= read_back(kept)


def test_key_follows_the_model_file(model, tmp_path):
    gguf = GGUFFile(model)
    key = weights_file.weights_key(gguf)
    assert key == weights_file.weights_key(GGUFFile(model))
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert weights_file.weights_key(GGUFFile(model)) != key


def test_daemon_restart_takes_the_kept_weights_and_answers_the_same(make_daemon, tmp_path):
    case = reference_cases()[0]
    env = {"RKLLMD_MODEL_WEIGHTS_DIR": str(tmp_path / "weights"), "RKLLMD_MODEL_WEIGHTS_HUGE_PAGES": "true"}  # the default
    seen = []
    for _ in range(2):
        daemon = make_daemon(env=env)
        with daemon.client() as client:
            seen.append(client.status()["model"]["weights"])
            result = client.generate(messages=case["messages"], max_tokens=case["max_tokens"], temperature=0).wait()
        assert result.text == case["completion"]
        assert f"weights:  {seen[-1]}\n" in rkllmctl("status", socket=daemon.socket).stdout
        assert daemon.stop() == 0
    [kept] = kept_files(tmp_path / "weights")
    assert seen[0] == f"dequantized, kept in {kept}" and seen[1] in read_back(kept)


def test_full_disk_keeps_nothing_partial_and_still_loads(model, tmp_path, caplog):
    with tmpfs(tmp_path / "small", "16k") as folder:  # the tiny model's weights need ~110 KB
        backend = loaded(model, folder)
        assert backend.describe()["weights"] == "dequantized (not kept: cannot write)"
        assert "No space left" in caplog.text or "no space" in caplog.text.lower()
        assert [p.name for p in folder.iterdir() if p.name != LOCK_NAME] == []
        assert outputs(backend) == outputs(loaded(model, None))
