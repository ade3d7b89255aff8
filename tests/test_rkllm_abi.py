"""The ctypes binding against the vendor layouts, and wrong layouts against the fake runtime.

``data/rkllm_layouts.json`` is a copy of the sizes and offsets measured from the vendor
headers of releases 1.2.1, 1.2.3 and 1.3.0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_rkllm.build import ERRORS, write_model

from rkllmd.backends.rkllm import abi as rk
from rkllmd.backends.rkllm.library import LibraryInfo, RkllmStartupError
from rkllmd.backends.rkllm.runtime import RkllmRuntime

REPO = Path(__file__).resolve().parents[1]
RELEASES = json.loads((Path(__file__).parent / "data" / "rkllm_layouts.json").read_text())["releases"]
RENAMED = {"RKLLMMultiModelInput": "RKLLMMultiModalInput"}  # 1.2.1's spelling of the same struct

README_FUNCTIONS = {
    "rkllm_createDefaultParam", "rkllm_init", "rkllm_load_lora", "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache", "rkllm_destroy", "rkllm_run", "rkllm_run_async", "rkllm_abort",
    "rkllm_is_running", "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size", "rkllm_set_chat_template",
    "rkllm_set_function_tools", "rkllm_set_cross_attn_params",
}


def _cases():
    for release, structs in RELEASES.items():
        for name in structs:
            yield pytest.param(release, name, id=f"{release}-{name}")


@pytest.mark.parametrize("release,name", list(_cases()))
def test_struct_matches_vendor_layout(release, name):
    expected = RELEASES[release][name]
    cls = rk.ABI[rk.RELEASES[release]].structs[RENAMED.get(name, name)]
    assert ctypes.sizeof(cls) == expected["size"]
    assert ctypes.alignment(cls) == expected["align"]
    fields = {k: v for k, v in expected.items() if k not in ("size", "align")}
    # Every vendor field at its offset (anonymous union members are reachable by name)...
    assert {field: getattr(cls, field).offset for field in fields} == fields
    # ...and no invented ones.
    assert set(rk.struct_layout(cls)) - {"size", "align"} == set(fields)


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_struct_of_a_generation_is_measured(release):
    ours = set(rk.ABI[rk.RELEASES[release]].structs)
    assert ours == {RENAMED.get(name, name) for name in RELEASES[release]}


@pytest.mark.parametrize("version,release", [("1.2", "1.2.3"), ("1.3", "1.3.0"), ("1.2.1", "1.2.1"),
                                             ("1.2.2", "1.2.1"), ("1.2.3", "1.2.3"), ("1.3.0", "1.3.0")])
def test_layout_cli_prints_the_vendor_table(version, release):
    out = subprocess.run(
        [sys.executable, "-m", "rkllmd.backends.rkllm.abi", "--layout", version],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(out) == RELEASES[release]


def test_prototype_table_covers_every_function():
    for generation in rk.GENERATIONS:
        assert set(rk.ABI[generation].prototypes()) == README_FUNCTIONS
    # The generation differences that matter at the call boundary.
    assert rk.ABI["1.2"].prototypes()["rkllm_init"][1][2] is rk.ResultCallback
    assert rk.ABI["1.3"].prototypes()["rkllm_init"][1][2] is ctypes.POINTER(rk.RKLLMCallback)
    assert rk.ABI["1.3"].prototypes()["rkllm_createDefaultParam"][0] is rk.RKLLMParam13


@pytest.mark.parametrize("generation", rk.GENERATIONS)
def test_runtime_binds_every_prototype(fake_runtime, generation):
    abi = rk.ABI[generation]
    rt = RkllmRuntime(LibraryInfo(fake_runtime[generation], None, generation, "test"), abi)
    for name, (restype, argtypes) in abi.prototypes().items():
        function = getattr(rt._lib, name)
        assert (function.restype, function.argtypes) == (restype, argtypes), name


# --- wrong layouts fail loudly ---------------------------------------------------------
@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model.rkllm")


def _raw(library: Path) -> ctypes.CDLL:
    """A view of the library without prototypes, to pass deliberately wrong things."""
    return ctypes.CDLL(str(library))


def _arena(obj: ctypes.Structure, size: int = 512) -> ctypes.Array:
    """``obj`` at the start of a buffer filled with 0xA5: reading past it finds junk, not zeros."""
    buf = (ctypes.c_uint8 * size)(*([0xA5] * size))
    ctypes.memmove(buf, ctypes.byref(obj), ctypes.sizeof(obj))
    return buf


def _param(generation: str, model: Path) -> ctypes.Structure:
    p = rk.ABI[generation].RKLLMParam(model_path=str(model).encode(), max_context_len=512, max_new_tokens=16,
                                      top_k=1, n_keep=-1, top_p=1.0, temperature=1.0, repeat_penalty=1.0)
    p.extend_param.embed_flash = 1
    p.extend_param.n_batch = 1
    return p


_KEEP = []  # callbacks handed to C must outlive the handles made here


def _callback():
    cb = rk.ResultCallback(lambda result, userdata, state: 0)
    _KEEP.append(cb)
    return cb


def _init(lib: ctypes.CDLL, param, callback_arg) -> tuple[int, ctypes.c_void_p]:
    handle = ctypes.c_void_p()
    return lib.rkllm_init(ctypes.byref(handle), param, callback_arg), handle


def test_init_callback_shape_is_checked_both_ways(fake_runtime, model, capfd):
    rc, _ = _init(_raw(fake_runtime["1.3"]), ctypes.byref(_param("1.3", model)), _callback())
    assert rc == ERRORS["CALLBACK"]
    assert "the 1.3 interface takes a pointer to an RKLLMCallback struct" in capfd.readouterr().err

    callbacks = rk.RKLLMCallback(result_callback=_callback())
    _KEEP.append(callbacks)
    rc, _ = _init(_raw(fake_runtime["1.2"]), ctypes.byref(_param("1.2", model)), ctypes.byref(callbacks))
    assert rc == ERRORS["CALLBACK"]
    assert "the 1.2 interface takes the result callback itself" in capfd.readouterr().err


def test_correct_init_is_accepted(fake_runtime, model):
    rc, handle = _init(_raw(fake_runtime["1.2"]), ctypes.byref(_param("1.2", model)), _callback())
    assert rc == 0 and handle.value
    callbacks = rk.RKLLMCallback(result_callback=_callback())
    _KEEP.append(callbacks)
    rc, handle = _init(_raw(fake_runtime["1.3"]), ctypes.byref(_param("1.3", model)), ctypes.byref(callbacks))
    assert rc == 0 and handle.value


def test_param_of_the_other_generation_is_caught(fake_runtime, model, capfd):
    callbacks = rk.RKLLMCallback(result_callback=_callback())
    _KEEP.append(callbacks)
    # 1.2's RKLLMParam (extend_param at 88) read by 1.3 (extend_param at 60).
    rc, _ = _init(_raw(fake_runtime["1.3"]), _arena(_param("1.2", model)), ctypes.byref(callbacks))
    assert rc == ERRORS["PARAM"]
    assert "extend_param.reserved" in capfd.readouterr().err
    # 1.3's RKLLMParam read by 1.2: 1.2 expects image-tag pointers where 1.3 has extend_param.
    rc, _ = _init(_raw(fake_runtime["1.2"]), _arena(_param("1.3", model)), _callback())
    assert rc == ERRORS["PARAM"]
    assert "fake-rkllm: rkllm_init:" in capfd.readouterr().err


def test_swapped_prompt_cache_struct_is_caught(fake_runtime, model, capfd):
    """The bug a public RKLLM server shipped: RKLLMPromptCacheParam's fields swapped."""

    class SwappedPromptCacheParam(ctypes.Structure):
        _fields_ = [("prompt_cache_path", ctypes.c_char_p), ("save_prompt_cache", ctypes.c_int)]

    class InferParam(ctypes.Structure):
        _fields_ = [("mode", ctypes.c_int), ("lora_params", ctypes.c_void_p),
                    ("prompt_cache_params", ctypes.POINTER(SwappedPromptCacheParam)), ("keep_history", ctypes.c_int)]

    lib = _raw(fake_runtime["1.2"])
    rc, handle = _init(lib, ctypes.byref(_param("1.2", model)), _callback())
    assert rc == 0
    cache = SwappedPromptCacheParam(prompt_cache_path=b"/tmp/never-written", save_prompt_cache=1)
    infer = InferParam(prompt_cache_params=ctypes.pointer(cache))
    inp = rk.RKLLMInput12(role=b"user", input_type=rk.RKLLM_INPUT_PROMPT)
    inp.prompt_input = b"hello"
    assert lib.rkllm_run(handle, ctypes.byref(inp), ctypes.byref(infer), None) == ERRORS["INFER"]
    assert "save_prompt_cache (offset 0)" in capfd.readouterr().err


def test_1_2_infer_param_given_to_1_3_is_caught(fake_runtime, model, capfd):
    lib = _raw(fake_runtime["1.3"])
    callbacks = rk.RKLLMCallback(result_callback=_callback())
    _KEEP.append(callbacks)
    rc, handle = _init(lib, ctypes.byref(_param("1.3", model)), ctypes.byref(callbacks))
    assert rc == 0
    inp = rk.RKLLMInput13(role=b"user", input_type=rk.RKLLM_INPUT_PROMPT)
    inp.prompt_input = b"hello"
    # Without sampling_params, keep_history sits at 24; 1.3 reads it at 32 (past the struct).
    infer = _arena(rk.RKLLMInferParam12(mode=rk.RKLLM_INFER_GENERATE, keep_history=0))
    assert lib.rkllm_run(handle, ctypes.byref(inp), infer, None) == ERRORS["INFER"]
    assert "keep_history (offset 32)" in capfd.readouterr().err


def test_binding_raises_when_its_layout_is_wrong(fake_runtime, model):
    """Through RkllmRuntime: a broken Abi makes rkllm_init fail, and the binding raises with the code."""
    broken = dataclasses.replace(rk.ABI["1.3"], RKLLMParam=rk.RKLLMParam12)
    rt = RkllmRuntime(LibraryInfo(fake_runtime["1.3"], "1.3.0", "1.3", "test"), broken)
    with pytest.raises(RkllmStartupError) as err:
        rt.init(_param("1.2", model))
    assert err.value.runtime_code == ERRORS["PARAM"]

    wrong_generation = RkllmRuntime(LibraryInfo(fake_runtime["1.3"], "1.3.0", "1.2", "test"), rk.ABI["1.2"])
    with pytest.raises(RkllmStartupError) as err:
        wrong_generation.init(_param("1.2", model))
    assert err.value.runtime_code == ERRORS["CALLBACK"]


@pytest.mark.parametrize("generation", rk.GENERATIONS)
def test_default_param_leaves_bytes_unwritten_and_the_binding_defines_them(fake_runtime, generation, model):
    """The fake's rkllm_createDefaultParam, like the vendor's, never writes the bytes an older
    release had as reserved; a binding that passes them on is refused, ours zeroes them."""
    rt = RkllmRuntime(LibraryInfo(fake_runtime[generation], None, generation, "test"), rk.ABI[generation])
    raw = rt.default_param()
    assert raw.extend_param.use_cross_attn != 0 and any(raw.extend_param.reserved)
    assert raw.extend_param.enabled_cpus_num == bin(raw.extend_param.enabled_cpus_mask).count("1") == 4
    raw.model_path = str(model).encode()
    raw.extend_param.n_batch = 1
    with pytest.raises(RkllmStartupError) as err:
        rt.init(raw)
    assert err.value.runtime_code == ERRORS["PARAM"]

    from rkllmd.backends.rkllm.backend import _zeroed_where_unwritten

    param = _zeroed_where_unwritten(rt.default_param())
    param.model_path = str(model).encode()
    param.extend_param.n_batch = 1
    rt.init(param)
    rt.destroy()
